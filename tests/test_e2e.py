"""End to end through the local cloud: the real CDK CLI, a moto server with IAM
enforced, the per-instance IMDS emulator, the supervisor and real torch training.

Each scenario is one `python -m emulator run` (about a minute on a 2-core machine).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = PROJECT_ROOT / "emulator" / "scenarios"

pytestmark = pytest.mark.e2e


def run_scenario(scenario: Path, work_dir: Path) -> tuple[dict, str]:
    report_path = work_dir / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "emulator", "run", "--scenario", str(scenario),
         "--report", str(report_path), "--work-dir", str(work_dir / "cloud")],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"emulator run failed ({result.returncode}):\n{output[-4000:]}"
    return json.loads(report_path.read_text()), output


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, tuple[dict, str]]:
    results = {}
    for name in ("demo", "no-interruption", "two-interruptions"):
        work_dir = tmp_path_factory.mktemp(name)
        results[name] = run_scenario(SCENARIOS / f"{name}.json", work_dir)
    return results


def test_demo_completes_after_one_interruption(reports):
    report, _ = reports["demo"]
    assert report["status"] == "completed"
    assert report["run_state"] == "completed"
    assert report["instances_launched"] == 2
    assert len(report["interruptions"]) == 1


def test_demo_loses_at_most_one_step(reports):
    report, _ = reports["demo"]
    interruption = report["interruptions"][0]
    assert interruption["steps_lost"] is not None
    assert interruption["steps_lost"] <= 1
    assert interruption["checkpoint_step"] >= interruption["step_at_notice"]
    assert interruption["resumed_from"] == interruption["checkpoint_step"]


def test_demo_interruption_lands_mid_epoch(reports):
    report, _ = reports["demo"]
    notice_step = report["interruptions"][0]["step_at_notice"]
    steps_per_epoch = report["final_step"] // 15  # ml.digits default: 15 epochs
    assert notice_step % steps_per_epoch != 0


def test_demo_leaves_nothing_running(reports):
    report, _ = reports["demo"]
    assert report["asg_desired_capacity_at_end"] == 0
    assert report["running_instances_at_end"] == 0
    assert report["stack_deleted"] is True
    assert report["timed_out"] is False


def test_demo_reports_training_result(reports):
    report, _ = reports["demo"]
    assert report["final_step"] == 675
    assert 0 < report["final_loss"] < 0.5
    assert report["val_accuracy"] > 0.9
    assert len(report["final_weights_sha256"]) == 64


def test_demo_prints_each_phase(reports):
    _, output = reports["demo"]
    for phrase in ("cdk deploy: stack", "started (", "training on", "notice sent to",
                   "committed to S3", "resumed from checkpoint", "training completed",
                   "cdk destroy: stack deleted", "report:"):
        assert phrase in output, f"missing progress line containing {phrase!r}"


def test_interruptions_do_not_change_final_weights(reports):
    hashes = {name: report["final_weights_sha256"] for name, (report, _) in reports.items()}
    assert len(set(hashes.values())) == 1, hashes


def test_two_interruptions_use_three_instances(reports):
    report, _ = reports["two-interruptions"]
    assert report["status"] == "completed"
    assert report["instances_launched"] == 3
    assert [item["steps_lost"] for item in report["interruptions"]] == [0, 0]


def test_no_interruption_uses_one_instance(reports):
    report, _ = reports["no-interruption"]
    assert report["status"] == "completed"
    assert report["instances_launched"] == 1
    assert report["interruptions"] == []
