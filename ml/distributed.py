"""Data-parallel training under torchrun, as ``ml.contract`` requires it.

The supervisor starts the training command through torchrun (``ml.launch``) when a run
uses more than one process: several GPUs on one instance, several instances, or both.
torchrun sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and the rendezvous variables.
This module turns them into a process group and gives the training loop the few
collective decisions it needs:

* ``agree_on_requests``: every rank acts on a save request at the same step, although
  the supervisor of only one instance received the spot notice.
* ``gather_rng_states``: each rank's RNG states go into the checkpoint, so a resumed
  run draws the same random numbers on every rank.
* ``check_same_resume_step``: all ranks resume from the same committed step.

Every instance keeps a full replica of the model and optimizer (DDP keeps them equal),
so local rank 0 of every instance writes the checkpoint to its own disk. Any instance
can then hand the newest checkpoint to S3, whichever of them holds the run lease.

A collective that fails because a peer died or hangs raises ``PeerLostError``, and the
training process exits with ``contract.EXIT_PEER_LOST`` without saving: its state may
be half-way through a step. The supervisor starts a new rendezvous round from the
newest committed checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ml import contract

logger = logging.getLogger(__name__)

DEFAULT_COLLECTIVE_TIMEOUT_S = 300.0


class PeerLostError(Exception):
    """A collective failed or timed out: a peer process or instance is gone or hung."""


@dataclass(frozen=True)
class ProcessGroupInfo:
    """This process's place in the job, as torchrun describes it."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_count: int

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def writes_files(self) -> bool:
        """Whether this process writes checkpoints, progress and outputs on its instance."""
        return self.local_rank == 0


SINGLE_PROCESS = ProcessGroupInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, node_count=1)


def collective_timeout(environ: dict[str, str]) -> timedelta:
    """Return the timeout of one collective from ``SPOTRUN_COLLECTIVE_TIMEOUT`` (seconds)."""
    text = environ.get(contract.ENV_COLLECTIVE_TIMEOUT, "").strip()
    if not text:
        return timedelta(seconds=DEFAULT_COLLECTIVE_TIMEOUT_S)
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(
            f"invalid {contract.ENV_COLLECTIVE_TIMEOUT}={text!r}: expected a positive number of seconds"
        )
    return timedelta(seconds=seconds)


def launched_by_torchrun(environ: dict[str, str]) -> bool:
    return "TORCHELASTIC_RUN_ID" in environ and "RANK" in environ


def init_process_group(device: torch.device, environ: dict[str, str]) -> ProcessGroupInfo:
    """Join the process group that torchrun set up, or return SINGLE_PROCESS.

    Uses NCCL for CUDA devices and gloo otherwise. A collective that waits longer than
    ``SPOTRUN_COLLECTIVE_TIMEOUT`` raises, so a rank whose peer died does not wait
    forever.
    """
    if not launched_by_torchrun(environ):
        return SINGLE_PROCESS
    timeout = collective_timeout(environ)
    backend = "nccl" if device.type == "cuda" else "gloo"
    # NOTE: the NCCL path has not run in the tests, which use gloo on CPU.
    try:
        dist.init_process_group(backend=backend, timeout=timeout)
    except (RuntimeError, ValueError) as error:
        raise PeerLostError(f"could not join the process group ({backend}): {error}") from error
    info = ProcessGroupInfo(
        rank=dist.get_rank(),
        local_rank=int(environ.get("LOCAL_RANK", "0")),
        world_size=dist.get_world_size(),
        local_world_size=int(environ.get("LOCAL_WORLD_SIZE", "1")),
        node_count=int(environ.get("GROUP_WORLD_SIZE", "1")),
    )
    logger.info(
        "rank %d of %d (local rank %d of %d, %d instances), backend %s, collective timeout %.0f s",
        info.rank,
        info.world_size,
        info.local_rank,
        info.local_world_size,
        info.node_count,
        backend,
        timeout.total_seconds(),
    )
    return info


def leave_process_group(info: ProcessGroupInfo, device: torch.device) -> None:
    """Wait until every rank is done, then destroy the process group."""
    if not info.is_distributed:
        return
    all_reduce_max([0], info, device)
    dist.barrier()
    dist.destroy_process_group()


def _collective_failed(operation: str, error: BaseException) -> PeerLostError:
    return PeerLostError(f"collective {operation} failed, so a peer is gone or hung: {error}")


def all_reduce_max(values: list[int], info: ProcessGroupInfo, device: torch.device) -> list[int]:
    """Return the element-wise maximum of ``values`` over all ranks."""
    if not info.is_distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    try:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    except RuntimeError as error:
        raise _collective_failed("all_reduce", error) from error
    return [int(value) for value in tensor.tolist()]


def all_reduce_sum(value: float, info: ProcessGroupInfo, device: torch.device) -> float:
    """Return the sum of ``value`` over all ranks, in float64."""
    if not info.is_distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    try:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    except RuntimeError as error:
        raise _collective_failed("all_reduce", error) from error
    return float(tensor.item())


def agree_on_requests(save_and_exit: bool, save_now: bool, info: ProcessGroupInfo,
                      device: torch.device) -> tuple[bool, bool]:
    """Return (save and exit, save now) as requested on any rank.

    Call it at every step boundary on every rank, so all ranks save at the same step.
    """
    flags = all_reduce_max([int(save_and_exit), int(save_now)], info, device)
    return bool(flags[0]), bool(flags[1])


def all_gather_object(value: Any, info: ProcessGroupInfo) -> list[Any]:
    """Return ``value`` of every rank, indexed by rank."""
    if not info.is_distributed:
        return [value]
    gathered: list[Any] = [None] * info.world_size
    try:
        dist.all_gather_object(gathered, value)
    except RuntimeError as error:
        raise _collective_failed("all_gather_object", error) from error
    return gathered


def gather_rng_states(info: ProcessGroupInfo) -> list[dict[str, Any]]:
    """Return the RNG states of every rank, indexed by rank."""
    from ml.checkpoint import capture_rng_states

    return all_gather_object(capture_rng_states(), info)


def restore_rank_rng_state(states: list[dict[str, Any]] | None, info: ProcessGroupInfo, seed: int) -> None:
    """Restore this rank's RNG states from a checkpoint's per-rank list.

    A checkpoint saved with another world size has no entry for some ranks, so those
    ranks are seeded from ``seed`` and their rank. Their random numbers then differ from
    the saved run, which is expected after the world size changed.
    """
    from ml.checkpoint import restore_rng_states

    if states is not None and len(states) == info.world_size:
        restore_rng_states(states[info.rank])
        return
    saved = len(states) if states is not None else 1
    logger.warning(
        "checkpoint has RNG states of %d ranks but the job has %d; seeding rank %d afresh",
        saved,
        info.world_size,
        info.rank,
    )
    seed_rank(seed, info)


def seed_rank(seed: int, info: ProcessGroupInfo) -> None:
    """Give each rank its own random stream (dropout differs per rank), derived from ``seed``."""
    if info.is_distributed:
        torch.manual_seed(seed * 100_003 + info.rank + 1)


def check_same_resume_step(step: int | None, info: ProcessGroupInfo) -> None:
    """Raise PeerLostError unless every rank resumes from the same step.

    Instances download the newest committed checkpoint independently. One that looked
    before a newer checkpoint was committed would resume from an older step, and the
    ranks would train on different states.
    """
    steps = all_gather_object(step, info)
    if len(set(steps)) > 1:
        raise PeerLostError(
            f"ranks would resume from different checkpoints (steps by rank: {steps}); the "
            "supervisors start a new round from the newest committed checkpoint"
        )


def local_slice(indices: list[int], info: ProcessGroupInfo) -> list[int]:
    """Return this rank's share of a global batch: every world_size-th sample from its rank."""
    return indices[info.rank :: info.world_size]


def is_collective_error(error: BaseException) -> bool:
    """Return whether an error raised during a training step comes from a collective.

    DDP all-reduces gradients inside ``backward``, so a dead peer surfaces there as a
    ``torch.distributed.DistError`` (or a RuntimeError from gloo or NCCL).
    """
    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        word in text for word in ("gloo", "nccl", "connection closed", "connection reset", "timed out")
    )


def exit_code_for(error: PeerLostError) -> int:
    logger.error("%s; exiting with %d so that the supervisor starts a new round", error, contract.EXIT_PEER_LOST)
    return contract.EXIT_PEER_LOST


def visible_process_count() -> int:
    """Return the processes per instance torchrun should start: one per GPU, else one."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return max(1, count)

