"""Failure paths through the local cloud: IMDS faults, crashes, hangs, lost supervisors,
duplicate instances and the maximum run time.

One moto server and one `cdk bootstrap` serve the whole module. Each scenario deploys its
own stack (its own run name), runs a short digits job (3 epochs, 135 steps) and destroys
the stack. Every path must end with the group at zero and no instance running.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from emulator.__main__ import Console, run_on_cloud, start_cloud
from emulator.cloud import LocalCloud
from emulator.scenario import parse_scenario
from ml.checkpoint import state_dict_sha256

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHORT_TRAINING = {"train_command": ["{python}", "-m", "ml.digits", "--epochs", "3"],
                  "checkpoint_every_steps": 25}
FINAL_STEP = 135

pytestmark = pytest.mark.e2e
_run_numbers = itertools.count(1)


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("faults-cloud")
    local_cloud = LocalCloud(work_dir / "cloud", PROJECT_ROOT)
    try:
        start_cloud(local_cloud, Console())
        yield local_cloud
    finally:
        local_cloud.stop()


def run(cloud: LocalCloud, tmp_path: Path, *, params: dict | None = None,
        interruptions: list | None = None, faults: list | None = None,
        timeout_seconds: float = 300) -> dict:
    run_name = f"fault-{next(_run_numbers)}"
    scenario = parse_scenario({
        "description": run_name,
        "params": {"run_name": run_name, **SHORT_TRAINING, **(params or {})},
        "interruptions": interruptions or [],
        "faults": faults or [],
        "timeout_seconds": timeout_seconds,
    })
    report = run_on_cloud(cloud, scenario, tmp_path, Console())
    report["work_dir"] = tmp_path / run_name
    return report


def assert_nothing_left(report: dict) -> None:
    assert report["asg_desired_capacity_at_end"] == 0
    assert report["running_instances_at_end"] == 0
    assert report["stack_deleted"] is True
    assert report["timed_out"] is False


def console_logs(report: dict) -> str:
    return "\n".join(path.read_text(errors="replace")
                     for path in sorted(report["work_dir"].glob("instances/*/console.log")))


@pytest.fixture(scope="module")
def baseline(cloud, tmp_path_factory) -> dict:
    report = run(cloud, tmp_path_factory.mktemp("baseline"))
    assert report["status"] == "completed"
    return report


def test_baseline_completes_on_one_instance(baseline):
    assert baseline["instances_launched"] == 1
    assert baseline["final_step"] == FINAL_STEP
    assert baseline["ending"] == "completed"
    assert_nothing_left(baseline)


def spotrun_cli(cloud: LocalCloud, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spotrun_cli", *arguments],
                          cwd=PROJECT_ROOT, env=cloud.admin_env(), capture_output=True,
                          text=True, timeout=120)


def test_cli_status_matches_finished_run(cloud, baseline):
    result = spotrun_cli(cloud, "status", baseline["run_name"], "--bucket",
                         baseline["bucket"], "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["state"] == "completed"
    assert status["done"] is True
    assert status["final_step"] == baseline["final_step"]
    assert status["final_loss"] == baseline["final_loss"]
    assert status["instances_launched"] == baseline["instances_launched"]
    assert status["interruptions"] == len(baseline["interruptions"])


def test_cli_report_and_download_of_finished_run(cloud, baseline, tmp_path):
    report = spotrun_cli(cloud, "report", baseline["run_name"], "--bucket",
                         baseline["bucket"], "--out", str(tmp_path / "report"),
                         "--link-images")
    assert report.returncode == 0, report.stderr
    loss_png = tmp_path / "report" / "loss.png"
    assert loss_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert loss_png.stat().st_size > 10_000
    assert "loss.png" in (tmp_path / "report" / "index.html").read_text()

    download = spotrun_cli(cloud, "download", baseline["run_name"], "--bucket",
                           baseline["bucket"], "--out", str(tmp_path / "output"))
    assert download.returncode == 0, download.stderr
    metrics = json.loads((tmp_path / "output" / "metrics.json").read_text())
    assert metrics["final_weights_sha256"] == baseline["final_weights_sha256"]
    state = torch.load(tmp_path / "output" / "model.pt", map_location="cpu", weights_only=True)
    assert state_dict_sha256(state) == baseline["final_weights_sha256"]


@pytest.mark.parametrize("kind, extra", [
    ("imds-unauthorized", {"duration_seconds": 3}),
    ("imds-token-expiry", {}),
    ("imds-token-hang", {"duration_seconds": 3}),
    ("imds-refused", {"duration_seconds": 3}),
    ("imds-server-error", {"duration_seconds": 3}),
    ("imds-throttle", {"duration_seconds": 3}),
    ("imds-slow", {"duration_seconds": 3, "delay_seconds": 1.5}),
])
def test_notice_during_imds_fault_is_honoured(cloud, tmp_path, baseline, kind, extra):
    # Slower steps keep the trainer busy until the notice gets through the fault.
    slow_steps = ["{python}", "-m", "ml.digits", "--epochs", "3", "--step-delay", "0.05"]
    report = run(cloud, tmp_path, params={"train_command": slow_steps},
                 faults=[{"kind": kind, "after_step": 40, **extra}],
                 interruptions=[{"after_step": 40, "notice_seconds": 12}])
    assert report["status"] == "completed", report["reason"]
    assert report["instances_launched"] == 2
    assert len(report["interruptions"]) == 1
    assert report["interruptions"][0]["steps_lost"] == 0
    assert report["final_weights_sha256"] == baseline["final_weights_sha256"]
    assert_nothing_left(report)


def test_imds_refused_at_start_fails_loudly(cloud, tmp_path, baseline):
    report = run(cloud, tmp_path,
                 faults=[{"kind": "imds-refused", "on_boot": True, "duration_seconds": 20}])
    assert report["status"] == "completed"
    assert report["instances_launched"] == 2
    logs = console_logs(report)
    assert "HttpPutResponseHopLimit" in logs or "HttpEndpoint" in logs
    assert report["final_weights_sha256"] == baseline["final_weights_sha256"]
    assert_nothing_left(report)


def test_notice_during_start_up_ends_instance_cleanly(cloud, tmp_path, baseline):
    report = run(cloud, tmp_path, interruptions=[{"on_boot": True, "notice_seconds": 10}])
    assert report["status"] == "completed"
    assert report["instances_launched"] == 2
    notices = [event for event in report["events"] if event["type"] == "interruption_notice"]
    assert len(notices) == 1
    assert report["final_weights_sha256"] == baseline["final_weights_sha256"]
    assert_nothing_left(report)


def test_rebalance_triggers_early_checkpoint(cloud, tmp_path, baseline):
    report = run(cloud, tmp_path, params={"checkpoint_every_steps": 0},
                 faults=[{"kind": "rebalance", "after_step": 40}])
    assert report["status"] == "completed"
    assert report["instances_launched"] == 1
    types = [event["type"] for event in report["events"]]
    assert "rebalance_recommendation" in types
    committed = [event["step"] for event in report["events"]
                 if event["type"] == "checkpoint_committed"]
    assert any(40 <= step < FINAL_STEP for step in committed), committed
    assert report["final_weights_sha256"] == baseline["final_weights_sha256"]


def test_single_trainer_crash_restarts_in_place(cloud, tmp_path, baseline):
    report = run(cloud, tmp_path, faults=[{"kind": "trainer-crash", "after_step": 60}])
    assert report["status"] == "completed"
    assert report["crashes"] == 1
    assert report["instances_launched"] == 1
    assert report["final_weights_sha256"] == baseline["final_weights_sha256"]
    assert_nothing_left(report)


def test_crash_loop_spends_budget_and_fails(cloud, tmp_path):
    report = run(cloud, tmp_path,
                 params={"max_crash_restarts": 2, "max_restarts_without_progress": 10,
                         "checkpoint_every_steps": 10},
                 faults=[{"kind": "trainer-crash", "after_step": 30, "repeat": True}])
    assert report["status"] == "failed"
    assert report["run_state"] == "failed"
    assert report["ending"] == "crash_budget_spent"
    assert "max_crash_restarts" in report["reason"]
    assert report["crashes"] == 3
    assert report["log_tail"], "the status must carry the trainer's last log lines"
    assert_nothing_left(report)


def test_no_progress_loop_fails(cloud, tmp_path):
    report = run(cloud, tmp_path,
                 params={"max_crash_restarts": 10, "max_restarts_without_progress": 2,
                         "checkpoint_every_steps": 100},
                 faults=[{"kind": "trainer-crash", "after_step": 30, "repeat": True}])
    assert report["status"] == "failed"
    assert report["ending"] == "no_progress"
    assert "max_restarts_without_progress" in report["reason"]
    assert report["crashes"] == 2
    assert_nothing_left(report)


def test_hung_trainer_is_killed_and_restarted(cloud, tmp_path, baseline):
    report = run(cloud, tmp_path, params={"heartbeat_timeout_seconds": 6},
                 faults=[{"kind": "trainer-hang", "after_step": 60}])
    assert report["status"] == "completed"
    assert report["crashes"] == 1
    hung = [event for event in report["events"]
            if event["type"] == "trainer_crash" and event.get("hung")]
    assert len(hung) == 1
    assert report["final_weights_sha256"] == baseline["final_weights_sha256"]
    assert_nothing_left(report)


def test_max_runtime_stops_with_checkpoint(cloud, tmp_path):
    report = run(cloud, tmp_path,
                 params={"max_runtime_hours": 0.002,
                         "train_command": ["{python}", "-m", "ml.digits", "--epochs", "3",
                                           "--step-delay", "0.1"]})
    assert report["status"] == "failed"
    assert report["run_state"] == "stopped"
    assert report["ending"] == "max_runtime"
    stopped = [event for event in report["events"] if event["type"] == "stopped"]
    assert stopped and stopped[0]["committed_step"] > 0
    assert_nothing_left(report)


def test_supervisor_death_is_counted_and_survived(cloud, tmp_path, baseline):
    report = run(cloud, tmp_path, faults=[{"kind": "supervisor-kill", "after_step": 60}])
    assert report["status"] == "completed"
    assert report["instances_launched"] == 2
    assert report["bootstrap_crashes"] == 1
    types = [event["type"] for event in report["events"]]
    assert "previous_instance_lost" in types
    assert report["final_weights_sha256"] == baseline["final_weights_sha256"]
    assert_nothing_left(report)


def test_duplicate_instance_never_trains(cloud, tmp_path, baseline):
    report = run(cloud, tmp_path, faults=[{"kind": "duplicate-instance", "after_step": 30}])
    assert report["status"] == "completed"
    assert report["instances_launched"] == 2
    started = {event["instance_id"] for event in report["events"]
               if event["type"] == "instance_started"}
    assert len(started) == 1
    trained = [path for path in report["work_dir"].glob("instances/*/work/progress.jsonl")]
    assert len(trained) == 1
    assert report["final_weights_sha256"] == baseline["final_weights_sha256"]
    assert_nothing_left(report)
