"""emulator.scenario: shipped scenarios, invalid scenarios and the command-line error path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from emulator.scenario import (
    DEFAULT_TIMEOUT_SECONDS,
    LOCAL_PARAMETER_DEFAULTS,
    MIN_NOTICE_SECONDS,
    Interruption,
    ScenarioError,
    load_scenario,
    parse_scenario,
)
from stacks.config import RunParameters

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SCENARIO_DIR = PROJECT_ROOT / "emulator" / "scenarios"
SHIPPED_SCENARIOS = sorted(path.name for path in SCENARIO_DIR.glob("*.json"))
CLI_TIMEOUT_SECONDS = 60


def test_documented_scenarios_shipped() -> None:
    for name in ("demo.json", "no-interruption.json", "two-interruptions.json"):
        assert name in SHIPPED_SCENARIOS


@pytest.mark.parametrize("name", SHIPPED_SCENARIOS)
def test_shipped_scenario_parses(name: str) -> None:
    path = SCENARIO_DIR / name
    data = json.loads(path.read_text())

    scenario = load_scenario(path)

    assert scenario.description == data["description"]
    steps = [item.after_step for item in scenario.interruptions]
    assert steps == [item["after_step"] for item in data.get("interruptions", [])]
    assert all(item.notice_seconds >= MIN_NOTICE_SECONDS for item in scenario.interruptions)
    cdk_context = json.loads((PROJECT_ROOT / "cdk.json").read_text())["context"]
    assert isinstance(scenario.run_parameters(cdk_context), RunParameters)


def test_two_interruptions_in_order() -> None:
    scenario = load_scenario(SCENARIO_DIR / "two-interruptions.json")

    assert scenario.interruptions == (
        Interruption(after_step=120, notice_seconds=10.0, action="terminate"),
        Interruption(after_step=300, notice_seconds=10.0, action="terminate"),
    )


def test_no_scenario_file_means_no_interruptions() -> None:
    scenario = load_scenario(None)

    assert scenario.interruptions == ()
    assert scenario.timeout_seconds == DEFAULT_TIMEOUT_SECONDS


def test_minimal_scenario_uses_defaults() -> None:
    scenario = parse_scenario({"interruptions": [{"after_step": 0,
                                                  "notice_seconds": MIN_NOTICE_SECONDS}]})

    assert scenario.interruptions == (
        Interruption(after_step=0, notice_seconds=MIN_NOTICE_SECONDS, action="terminate"),)
    assert scenario.params == {}
    assert scenario.timeout_seconds == DEFAULT_TIMEOUT_SECONDS


def test_scenario_params_override_context() -> None:
    scenario = parse_scenario({"params": {"checkpoint_every_steps": 40}})
    cdk_context = json.loads((PROJECT_ROOT / "cdk.json").read_text())["context"]

    params = scenario.run_parameters(cdk_context)

    assert params.checkpoint_every_steps == 40
    assert params.poll_interval_seconds == LOCAL_PARAMETER_DEFAULTS["poll_interval_seconds"]
    assert params.run_name == cdk_context["run_name"]


# Each case: scenario document, texts the message must contain.
INVALID_SCENARIOS = {
    "negative-after-step": (
        {"interruptions": [{"after_step": -1}]},
        ["interruptions[0]", "after_step=-1"]),
    "string-after-step": (
        {"interruptions": [{"after_step": "150"}]},
        ["interruptions[0]", 'after_step="150"']),
    "float-after-step": (
        {"interruptions": [{"after_step": 1.5}]},
        ["interruptions[0]", "after_step=1.5"]),
    "bool-after-step": (
        {"interruptions": [{"after_step": True}]},
        ["interruptions[0]", "after_step=true"]),
    "missing-after-step": (
        {"interruptions": [{"notice_seconds": 10}]},
        ["interruptions[0]", "after_step=null"]),
    "short-notice": (
        {"interruptions": [{"after_step": 10, "notice_seconds": 2}]},
        ["interruptions[0]", "notice_seconds=2", f"{MIN_NOTICE_SECONDS:g}"]),
    "string-notice": (
        {"interruptions": [{"after_step": 10, "notice_seconds": "10"}]},
        ["interruptions[0]", 'notice_seconds="10"']),
    "unknown-top-level-field": (
        {"interruption": []},
        ["unknown field 'interruption'"]),
    "unknown-interruption-field": (
        {"interruptions": [{"after_step": 10, "delay": 5}]},
        ["interruptions[0]", "unknown field 'delay'"]),
    "interruption-not-object": (
        {"interruptions": [150]},
        ["interruptions[0]", "must be an object"]),
    "unsorted-interruptions": (
        {"interruptions": [{"after_step": 300}, {"after_step": 120}]},
        ["after_step", "[300, 120]"]),
    "unknown-action": (
        {"interruptions": [{"after_step": 10, "action": "reboot"}]},
        ["interruptions[0]", 'action="reboot"']),
    "unknown-param": (
        {"params": {"no_such_param": 1}},
        ["'no_such_param'"]),
    "invalid-param-value": (
        {"params": {"keep_checkpoints": 1}},
        ["keep_checkpoints=1"]),
    "params-not-object": (
        {"params": ["checkpoint_every_steps", 40]},
        ["'params'"]),
    "zero-timeout": (
        {"timeout_seconds": 0},
        ["timeout_seconds=0"]),
    "string-timeout": (
        {"timeout_seconds": "900"},
        ['timeout_seconds="900"']),
    "unknown-target": (
        {"interruptions": [{"after_step": 10, "target": "primary"}]},
        ["interruptions[0]", 'target="primary"', "leader, member"]),
    "unknown-fault-target": (
        {"faults": [{"kind": "instance-kill", "after_step": 10, "target": 1}]},
        ["faults[0]", "target=1"]),
    "top-level-list": (
        [{"after_step": 10}],
        ["JSON object"]),
}


@pytest.mark.parametrize(("data", "shown"), INVALID_SCENARIOS.values(),
                         ids=INVALID_SCENARIOS.keys())
def test_invalid_scenario_rejected(data: object, shown: list[str]) -> None:
    with pytest.raises(ScenarioError) as raised:
        parse_scenario(data, source="bad.json")

    message = str(raised.value)
    assert message.startswith("bad.json: ")
    for text in shown:
        assert text in message
    assert "\n" not in message


@pytest.mark.parametrize("value", [5, None], ids=["number", "null"])
def test_interruptions_not_list_rejected(value: object) -> None:
    with pytest.raises(ScenarioError) as raised:
        parse_scenario({"interruptions": value}, source="bad.json")

    assert "interruptions" in str(raised.value)


def test_file_not_json_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"interruptions": [}')

    with pytest.raises(ScenarioError) as raised:
        load_scenario(path)

    assert str(path) in str(raised.value)
    assert "not valid JSON" in str(raised.value)


def test_file_not_utf8_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(b"\xff\xfe{\x00}\x00")

    with pytest.raises(ScenarioError) as raised:
        load_scenario(path)

    assert str(path) in str(raised.value)


def test_missing_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "missing.json"

    with pytest.raises(ScenarioError) as raised:
        load_scenario(path)

    assert str(path) in str(raised.value)
    assert "No such file or directory" in str(raised.value)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"timeout_seconds": -1}))

    with pytest.raises(ScenarioError) as raised:
        load_scenario(path)

    assert str(raised.value).startswith(f"{path}: ")
    assert "timeout_seconds=-1" in str(raised.value)


# Command line ---------------------------------------------------------------------


def run_emulator(scenario: Path, report: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "emulator", "run", "--scenario", str(scenario),
         "--report", str(report)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL,
        timeout=CLI_TIMEOUT_SECONDS)


CLI_BAD_FILES = {
    "negative-after-step": json.dumps({"interruptions": [{"after_step": -1}]}),
    "unknown-param": json.dumps({"params": {"no_such_param": 1}}),
    "invalid-param-value": json.dumps({"params": {"keep_checkpoints": 1}}),
    "top-level-list": "[]",
    "not-json": "{not json",
    "missing": None,
}


@pytest.mark.parametrize("content", CLI_BAD_FILES.values(), ids=CLI_BAD_FILES.keys())
def test_cli_bad_scenario_exits_2(tmp_path: Path, content: str | None) -> None:
    scenario = tmp_path / "bad.json"
    if content is not None:
        scenario.write_text(content)
    report = tmp_path / "report.json"

    result = run_emulator(scenario, report)

    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert str(scenario) in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not report.exists()


def test_cli_non_list_interruptions_exits_2(tmp_path: Path) -> None:
    scenario = tmp_path / "bad.json"
    scenario.write_text(json.dumps({"interruptions": 5}))

    result = run_emulator(scenario, tmp_path / "report.json")

    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_targets_and_instance_kill_parse() -> None:
    scenario = parse_scenario({
        "params": {"nodes": 2},
        "interruptions": [{"after_step": 5, "target": "member"}],
        "faults": [{"kind": "instance-kill", "after_step": 7, "target": "leader"}]})

    assert scenario.interruptions[0].target == "member"
    assert scenario.faults[0].kind == "instance-kill"
    assert scenario.faults[0].target == "leader"
    assert parse_scenario({"interruptions": [{"after_step": 5}]}).interruptions[0].target == "any"
