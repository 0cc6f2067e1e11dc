"""Training under torchrun, on one instance or several: the command line and the rounds.

A run with ``nodes`` > 1 trains in rounds. The run lease holder (the leader) waits
until enough instances have registered as members, then publishes a round in
``rendezvous.json``: a round number, the address of the c10d rendezvous store that its
torchrun agent hosts, the members taking part and the committed step they all resume
from. Every listed instance starts torchrun with that round's rendezvous id, and
torchrun's c10d rendezvous forms the process group. A round ends when the training
processes exit on any instance: after a save on a spot notice, after a lost peer, or
to let a new instance join. The leader then uploads the newest checkpoint and
publishes the next round. No instance needs SSH or a fixed address.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from bootstrap.config import ConfigError, RunConfig

# Members renew their record this often; the leader counts a member alive for three
# intervals.
MEMBER_HEARTBEAT_S = 3.0
MEMBER_FRESH_S = 3 * MEMBER_HEARTBEAT_S
LAUNCHER = ("{python}", "-m", "ml.launch")


@dataclass(frozen=True)
class Round:
    """One published rendezvous round of a multi-node run."""

    number: int
    endpoint: str
    leader: str
    members: tuple[str, ...]
    resume_step: int | None

    @property
    def node_count(self) -> int:
        return len(self.members) + 1

    def to_dict(self) -> dict:
        return {"round": self.number, "endpoint": self.endpoint, "leader": self.leader,
                "members": list(self.members), "resume_step": self.resume_step}

    @classmethod
    def from_dict(cls, data: dict) -> "Round":
        step = data.get("resume_step")
        return cls(number=int(data["round"]), endpoint=str(data["endpoint"]),
                   leader=str(data["leader"]), members=tuple(data.get("members", [])),
                   resume_step=None if step is None else int(step))

    def rendezvous_id(self, run_id: str) -> str:
        # torchrun closes a rendezvous when its agents exit, so every round needs a new id.
        return f"{run_id}-round-{self.number}"


def uses_torchrun(config: RunConfig) -> bool:
    """Return whether the run needs more than one training process."""
    return config.nodes > 1 or config.gpus_per_node != 1


def training_arguments(train_command: list[str]) -> list[str]:
    """Return the part of the training command that torchrun takes after its options.

    ``{python} -m module ARGS`` and ``{python} script.py ARGS`` pass through; any other
    executable runs with ``--no-python``.
    """
    if not train_command:
        raise ConfigError("train_command is empty")
    if train_command[0] != "{python}":
        return ["--no-python", *train_command]
    rest = train_command[1:]
    if not rest or (rest[0].startswith("-") and rest[0] != "-m"):
        raise ConfigError(
            f"train_command {train_command} cannot run under torchrun: after {{python}} it "
            "must continue with -m MODULE or a script path; interpreter options such as "
            f"{rest[0] if rest else '(nothing)'} are not supported")
    return rest


def torchrun_command(config: RunConfig, *, round_: Round | None, is_host: bool,
                     local_addr: str) -> list[str]:
    """Return the command that runs the training command under torchrun (``ml.launch``).

    Without a round (one instance) torchrun runs standalone with a local rendezvous.
    With ``gpus_per_node`` 0, ``ml.launch`` starts one process per visible GPU.
    """
    command = [*LAUNCHER, f"--nproc-per-node={config.gpus_per_node}", "--max-restarts=0"]
    if round_ is None:
        command += ["--nnodes=1", "--standalone"]
    else:
        conf = f"is_host={'true' if is_host else 'false'}," \
               f"join_timeout={int(config.rendezvous_timeout_seconds)}"
        command += [f"--nnodes={round_.node_count}", "--rdzv-backend=c10d",
                    f"--rdzv-endpoint={round_.endpoint}",
                    f"--rdzv-id={round_.rendezvous_id(config.run_id)}",
                    f"--rdzv-conf={conf}", f"--local-addr={local_addr}"]
    return command + training_arguments(config.train_command)


def free_port(address: str) -> int:
    """Return a TCP port that is free on ``address`` now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])
