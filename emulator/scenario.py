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
``after_step``; ``notice_seconds`` later the instance is reclaimed (killed) if it still
runs, and the group replaces it. Interruptions are delivered in the order given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from stacks.config import ParameterError, RunParameters, from_context

# Time compression of the local cloud, in one place. On EC2 a spot notice comes 120 s
# before the instance is reclaimed and spotrun polls IMDS every poll_interval_seconds.
DEFAULT_NOTICE_SECONDS = 10.0
LOCAL_PARAMETER_DEFAULTS = {"poll_interval_seconds": 0.5, "lease_ttl_seconds": 10,
                            "heartbeat_timeout_seconds": 20}
DEFAULT_TIMEOUT_SECONDS = 900.0
NOTICE_ACTIONS = ("terminate", "stop", "hibernate")
# The supervisor needs a few seconds of the window to commit the checkpoint.
MIN_NOTICE_SECONDS = 3.0


class ScenarioError(ValueError):
    """An invalid scenario; the message names the field, the value and the fix."""


@dataclass(frozen=True)
class Interruption:
    after_step: int
    notice_seconds: float = DEFAULT_NOTICE_SECONDS
    action: str = "terminate"


@dataclass(frozen=True)
class Scenario:
    description: str = ""
    params: dict = field(default_factory=dict)
    interruptions: tuple[Interruption, ...] = ()
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS

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
    except json.JSONDecodeError as error:
        raise ScenarioError(f"scenario file {path} is not valid JSON: {error}") from None
    return parse_scenario(data, source=str(path))


def parse_scenario(data: object, source: str = "scenario") -> Scenario:
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: expected a JSON object at the top level")
    known = {"description", "params", "interruptions", "timeout_seconds"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ScenarioError(f"{source}: unknown field {unknown[0]!r}; valid fields are "
                            f"{', '.join(sorted(known))}")
    params = data.get("params", {})
    if not isinstance(params, dict):
        raise ScenarioError(f"{source}: 'params' must be an object of stack parameters")
    interruptions = tuple(_parse_interruption(item, index, source)
                          for index, item in enumerate(data.get("interruptions", [])))
    steps = [item.after_step for item in interruptions]
    if steps != sorted(steps):
        raise ScenarioError(f"{source}: interruptions must be in increasing after_step "
                            f"order, got {steps}")
    timeout = data.get("timeout_seconds", DEFAULT_TIMEOUT_SECONDS)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ScenarioError(f"{source}: timeout_seconds={json.dumps(timeout)} must be a "
                            f"positive number of seconds")
    scenario = Scenario(description=str(data.get("description", "")), params=params,
                        interruptions=interruptions, timeout_seconds=float(timeout))
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
    unknown = sorted(set(item) - {"after_step", "notice_seconds", "action"})
    if unknown:
        raise ScenarioError(f"{where}: unknown field {unknown[0]!r}; valid fields are "
                            f"after_step, notice_seconds, action")
    after_step = item.get("after_step")
    if isinstance(after_step, bool) or not isinstance(after_step, int) or after_step < 0:
        raise ScenarioError(f"{where}: after_step={json.dumps(after_step)} must be an "
                            f"integer step >= 0")
    notice = item.get("notice_seconds", DEFAULT_NOTICE_SECONDS)
    if (isinstance(notice, bool) or not isinstance(notice, (int, float))
            or notice < MIN_NOTICE_SECONDS):
        raise ScenarioError(f"{where}: notice_seconds={json.dumps(notice)} must be a "
                            f"number of seconds >= {MIN_NOTICE_SECONDS:g}")
    action = item.get("action", "terminate")
    if action not in NOTICE_ACTIONS:
        raise ScenarioError(f"{where}: action={json.dumps(action)} must be one of "
                            f"{', '.join(NOTICE_ACTIONS)}")
    return Interruption(after_step=after_step, notice_seconds=float(notice), action=action)
