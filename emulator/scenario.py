"""Scenarios of the local cloud: what happens to a run, and the time scale it runs at.

A scenario is a JSON object::

    {
      "description": "one interruption in the middle of an epoch",
      "params": {"checkpoint_every_steps": 40},
      "interruptions": [{"after_step": 150, "notice_seconds": 10}],
      "timeout_seconds": 900
    }

``params`` overrides stack parameters of cdk.json for this run. Each interruption sends
a spot instance-action notice to the instance that is training once its progress passes
``after_step``. With ``"on_boot": true`` the notice goes to the next instance as soon as
it boots instead. ``notice_seconds`` later the instance is reclaimed (killed) if it still
runs, and the group replaces it. Interruptions are delivered in the order given.

``faults`` (optional) lists faults injected once the training instance passes
``after_step`` (or at boot with ``"on_boot": true``)::

    {"kind": "imds-server-error", "after_step": 60, "duration_seconds": 4}

Fault kinds:

* IMDS faults for ``duration_seconds``: ``imds-unauthorized``, ``imds-token-hang``,
  ``imds-refused``, ``imds-server-error``, ``imds-throttle`` and ``imds-slow`` (with
  ``delay_seconds``). ``imds-token-expiry`` acts once and takes no duration.
* ``rebalance``: a rebalance recommendation.
* ``trainer-crash``: the trainer process is killed, as by the OOM killer.
* ``trainer-hang``: the trainer process is stopped with SIGSTOP.
* ``supervisor-kill``: the supervisor process is killed.
* ``instance-kill``: the instance loses power: every process is killed at once, with no
  notice, and the group replaces the instance.
* ``duplicate-instance``: a second instance of the same launch template starts outside
  the group.

``"repeat": true`` makes ``trainer-crash`` and ``trainer-hang`` hit every trainer that
reaches ``after_step`` again after a restart.

With ``nodes`` > 1 in ``params``, ``"target": "leader"`` or ``"member"`` on an
interruption or a fault picks the instance that holds the run lease or one that does
not; the default ``"any"`` picks the first instance past ``after_step``.

``revoke_actions`` (optional) lists IAM actions, such as ``"s3:DeleteObject"``, that the
control plane removes from the instance role's inline policies right after deployment,
to check how a run fails when a permission is missing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from stacks.config import ParameterError, RunParameters, from_context

# Time compression of the local cloud, in one place. On EC2 a spot notice comes 120 s
# before the instance is reclaimed and spotrun polls IMDS every poll_interval_seconds.
DEFAULT_NOTICE_SECONDS = 10.0
LOCAL_PARAMETER_DEFAULTS = {"poll_interval_seconds": 0.5, "lease_ttl_seconds": 10,
                            "heartbeat_timeout_seconds": 20, "rendezvous_timeout_seconds": 60,
                            "collective_timeout_seconds": 10}
DEFAULT_TIMEOUT_SECONDS = 900.0
NOTICE_ACTIONS = ("terminate", "stop", "hibernate")
# Targets of a notice or fault in a multi-node run: any instance, the run lease holder
# (leader) or an instance without the lease (member).
TARGETS = ("any", "leader", "member")
# The supervisor needs a few seconds of the window to commit the checkpoint.
MIN_NOTICE_SECONDS = 3.0


class ScenarioError(ValueError):
    """An invalid scenario; the message names the field, the value and the fix."""


IMDS_FAULTS = {"imds-unauthorized": "unauthorized", "imds-token-expiry": "token-expiry",
               "imds-token-hang": "token-hang", "imds-refused": "refused",
               "imds-server-error": "server-error", "imds-throttle": "throttle",
               "imds-slow": "slow"}
FAULT_KINDS = (*IMDS_FAULTS, "rebalance", "trainer-crash", "trainer-hang",
               "supervisor-kill", "instance-kill", "duplicate-instance")
REPEATABLE_FAULTS = ("trainer-crash", "trainer-hang")
IAM_ACTION_PATTERN = re.compile(r"^[a-z0-9-]+:[A-Za-z0-9]+$")


@dataclass(frozen=True)
class Interruption:
    after_step: int = 0
    notice_seconds: float = DEFAULT_NOTICE_SECONDS
    action: str = "terminate"
    on_boot: bool = False
    target: str = "any"


@dataclass(frozen=True)
class Fault:
    kind: str
    after_step: int = 0
    on_boot: bool = False
    duration_seconds: float | None = None
    delay_seconds: float | None = None
    repeat: bool = False
    target: str = "any"


@dataclass(frozen=True)
class Scenario:
    description: str = ""
    params: dict = field(default_factory=dict)
    interruptions: tuple[Interruption, ...] = ()
    faults: tuple[Fault, ...] = ()
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    revoke_actions: tuple[str, ...] = ()

    def run_parameters(self, cdk_context: dict) -> RunParameters:
        """Merge cdk.json context, the local time scale and this scenario's overrides."""
        merged = {**cdk_context, **LOCAL_PARAMETER_DEFAULTS, **self.params}
        return from_context(merged)

    def context_overrides(self) -> dict:
        return {**LOCAL_PARAMETER_DEFAULTS, **self.params}


def load_scenario(path: Path | None) -> Scenario:
    if path is None:
        return Scenario(description="no interruptions")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ScenarioError(f"cannot read scenario file {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ScenarioError(f"scenario file {path} is not UTF-8 text; save it as UTF-8 "
                            f"JSON") from None
    except json.JSONDecodeError as error:
        raise ScenarioError(f"scenario file {path} is not valid JSON: {error}") from None
    return parse_scenario(data, source=str(path))


def parse_scenario(data: object, source: str = "scenario") -> Scenario:
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: expected a JSON object at the top level, got "
                            f"{type(data).__name__}")
    known = {"description", "params", "interruptions", "faults", "timeout_seconds",
             "revoke_actions"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ScenarioError(f"{source}: unknown field {unknown[0]!r}; valid fields are "
                            f"{', '.join(sorted(known))}")
    params = data.get("params", {})
    if not isinstance(params, dict):
        raise ScenarioError(f"{source}: 'params' must be an object of stack parameters")
    for name in ("interruptions", "faults"):
        if not isinstance(data.get(name, []), list):
            raise ScenarioError(f"{source}: '{name}' must be a list, got "
                                f"{json.dumps(data[name])}")
    interruptions = tuple(_parse_interruption(item, index, source)
                          for index, item in enumerate(data.get("interruptions", [])))
    faults = tuple(_parse_fault(item, index, source)
                   for index, item in enumerate(data.get("faults", [])))
    steps = [item.after_step for item in interruptions if not item.on_boot]
    if steps != sorted(steps):
        raise ScenarioError(f"{source}: interruptions must be in increasing after_step "
                            f"order, got {steps}")
    timeout = data.get("timeout_seconds", DEFAULT_TIMEOUT_SECONDS)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ScenarioError(f"{source}: timeout_seconds={json.dumps(timeout)} must be a "
                            f"positive number of seconds")
    revoke_actions = data.get("revoke_actions", [])
    if (not isinstance(revoke_actions, list)
            or not all(isinstance(action, str) and IAM_ACTION_PATTERN.match(action)
                       for action in revoke_actions)):
        raise ScenarioError(f"{source}: revoke_actions={json.dumps(revoke_actions)} must be "
                            f"a list of IAM actions without wildcards, such as "
                            f"[\"s3:DeleteObject\"]")
    scenario = Scenario(description=str(data.get("description", "")), params=params,
                        interruptions=interruptions, faults=faults,
                        timeout_seconds=float(timeout), revoke_actions=tuple(revoke_actions))
    try:
        from_context({**LOCAL_PARAMETER_DEFAULTS, **params})
    except ParameterError as error:
        raise ScenarioError(f"{source}: {error}") from None
    return scenario


def _parse_interruption(item: object, index: int, source: str) -> Interruption:
    where = f"{source}: interruptions[{index}]"
    if not isinstance(item, dict):
        raise ScenarioError(f"{where} must be an object such as "
                            f'{{"after_step": 100, "notice_seconds": 10}}')
    unknown = sorted(set(item) - {"after_step", "notice_seconds", "action", "on_boot",
                                  "target"})
    if unknown:
        raise ScenarioError(f"{where}: unknown field {unknown[0]!r}; valid fields are "
                            f"after_step, notice_seconds, action, on_boot, target")
    on_boot = _parse_on_boot(item, where)
    after_step = _parse_after_step(item, where, on_boot)
    notice = item.get("notice_seconds", DEFAULT_NOTICE_SECONDS)
    if (isinstance(notice, bool) or not isinstance(notice, (int, float))
            or notice < MIN_NOTICE_SECONDS):
        raise ScenarioError(f"{where}: notice_seconds={json.dumps(notice)} must be a "
                            f"number of seconds >= {MIN_NOTICE_SECONDS:g}")
    action = item.get("action", "terminate")
    if action not in NOTICE_ACTIONS:
        raise ScenarioError(f"{where}: action={json.dumps(action)} must be one of "
                            f"{', '.join(NOTICE_ACTIONS)}")
    return Interruption(after_step=after_step, notice_seconds=float(notice), action=action,
                        on_boot=on_boot, target=_parse_target(item, where))


def _parse_target(item: dict, where: str) -> str:
    target = item.get("target", "any")
    if target not in TARGETS:
        raise ScenarioError(f"{where}: target={json.dumps(target)} must be one of "
                            f"{', '.join(TARGETS)}")
    return target


def _parse_on_boot(item: dict, where: str) -> bool:
    on_boot = item.get("on_boot", False)
    if not isinstance(on_boot, bool):
        raise ScenarioError(f"{where}: on_boot={json.dumps(on_boot)} must be true or false")
    return on_boot


def _parse_after_step(item: dict, where: str, on_boot: bool) -> int:
    if on_boot:
        if "after_step" in item:
            raise ScenarioError(f"{where}: give either after_step or on_boot, not both")
        return 0
    after_step = item.get("after_step")
    if isinstance(after_step, bool) or not isinstance(after_step, int) or after_step < 0:
        raise ScenarioError(f"{where}: after_step={json.dumps(after_step)} must be an "
                            f"integer step >= 0 (or set \"on_boot\": true)")
    return after_step


def _positive_seconds(item: dict, name: str, where: str) -> float | None:
    value = item.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ScenarioError(f"{where}: {name}={json.dumps(value)} must be a positive "
                            f"number of seconds")
    return float(value)


def _parse_fault(item: object, index: int, source: str) -> Fault:
    where = f"{source}: faults[{index}]"
    if not isinstance(item, dict):
        raise ScenarioError(f"{where} must be an object such as "
                            f'{{"kind": "imds-server-error", "after_step": 50, '
                            f'"duration_seconds": 5}}')
    fields = {"kind", "after_step", "on_boot", "duration_seconds", "delay_seconds", "repeat",
              "target"}
    unknown = sorted(set(item) - fields)
    if unknown:
        raise ScenarioError(f"{where}: unknown field {unknown[0]!r}; valid fields are "
                            f"{', '.join(sorted(fields))}")
    kind = item.get("kind")
    if kind not in FAULT_KINDS:
        raise ScenarioError(f"{where}: kind={json.dumps(kind)} must be one of "
                            f"{', '.join(FAULT_KINDS)}")
    on_boot = _parse_on_boot(item, where)
    after_step = _parse_after_step(item, where, on_boot)
    duration = _positive_seconds(item, "duration_seconds", where)
    delay = _positive_seconds(item, "delay_seconds", where)
    timed = kind in IMDS_FAULTS and kind != "imds-token-expiry"
    if timed and duration is None:
        raise ScenarioError(f"{where}: {kind} needs duration_seconds")
    if not timed and duration is not None:
        raise ScenarioError(f"{where}: {kind} takes no duration_seconds")
    if (kind == "imds-slow") != (delay is not None):
        raise ScenarioError(f"{where}: delay_seconds is required for imds-slow and "
                            f"invalid for {kind}")
    repeat = item.get("repeat", False)
    if not isinstance(repeat, bool) or (repeat and kind not in REPEATABLE_FAULTS):
        raise ScenarioError(f"{where}: repeat={json.dumps(repeat)} is only valid (true or "
                            f"false) for {', '.join(REPEATABLE_FAULTS)}")
    return Fault(kind=kind, after_step=after_step, on_boot=on_boot,
                 duration_seconds=duration, delay_seconds=delay, repeat=repeat,
                 target=_parse_target(item, where))
