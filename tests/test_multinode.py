"""Two-instance runs end to end through the local cloud.

Each emulated instance runs its real user-data, supervisor and torchrun. The instances
find each other through the rendezvous record in the emulated S3 and train with gloo on
loopback. Each scenario takes about a minute on a 2-core machine.
"""

from __future__ import annotations

import pytest

from tests.test_e2e import SCENARIOS, run_scenario

pytestmark = pytest.mark.e2e

NAMES = ("two-nodes", "two-nodes-interrupted", "two-nodes-leader-interrupted",
         "two-nodes-peer-hang", "two-nodes-leader-lost")


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, tuple[dict, str]]:
    results = {}
    for name in NAMES:
        work_dir = tmp_path_factory.mktemp(name)
        results[name] = run_scenario(SCENARIOS / f"{name}.json", work_dir)
    return results


@pytest.mark.parametrize("name", NAMES)
def test_run_completes_and_ends_group(reports, name):
    report, _ = reports[name]
    assert report["status"] == "completed"
    assert report["run_state"] == "completed"
    assert report["final_step"] == 270
    assert report["asg_desired_capacity_at_end"] == 0
    assert report["running_instances_at_end"] == 0
    assert report["timed_out"] is False


@pytest.mark.parametrize("name", NAMES[1:])
def test_final_weights_match_uninterrupted(reports, name):
    uninterrupted, _ = reports["two-nodes"]
    report, _ = reports[name]
    assert report["final_weights_sha256"] == uninterrupted["final_weights_sha256"]
    assert report["final_loss"] == uninterrupted["final_loss"]


def test_two_nodes_form_one_round(reports):
    report, output = reports["two-nodes"]
    assert report["instances_launched"] == 2
    assert "round 1: 2 instance(s)" in output
    assert "round 2" not in output


def test_member_interruption_resumes_both(reports):
    report, output = reports["two-nodes-interrupted"]
    assert len(report["interruptions"]) == 1
    interruption = report["interruptions"][0]
    # Both instances saved the step after the notice, and the next round resumed it.
    assert interruption["checkpoint_step"] >= interruption["step_at_notice"]
    assert interruption["resumed_from"] == interruption["checkpoint_step"]
    assert interruption["steps_lost"] <= 1
    assert "round 2: 2 instance(s)" in output


def test_leader_interruption_hands_over_lease(reports):
    report, output = reports["two-nodes-leader-interrupted"]
    interruption = report["interruptions"][0]
    assert interruption["checkpoint_step"] >= interruption["step_at_notice"]
    assert interruption["resumed_from"] == interruption["checkpoint_step"]
    # The leader released the lease, so the member led round 2 without waiting for a TTL.
    started = [event for event in report["events"] if event["type"] == "instance_started"]
    members = {event["instance_id"] for event in started if event.get("role") == "member"}
    leaders = [event["instance_id"] for event in started if event.get("role") != "member"]
    assert len(leaders) == 2
    assert leaders[1] in members
    assert leaders[1] != interruption["instance_id"]
    assert "died without releasing the lease" not in output
    assert "round 2: 2 instance(s)" in output


def test_hung_peer_ends_round_without_hang(reports):
    report, output = reports["two-nodes-peer-hang"]
    assert report["faults_injected"][0]["kind"] == "trainer-hang"
    # The leader's all-reduce timed out: its round ended as a lost peer, not a crash.
    assert "round 1 ended with exit code 76" in output
    assert "round 2: 2 instance(s)" in output


def test_leader_loss_hands_over_lease(reports):
    report, output = reports["two-nodes-leader-lost"]
    assert report["faults_injected"][0]["kind"] == "instance-kill"
    assert "died without releasing the lease" in output
    assert "holds the run lease (generation 2)" in output
    assert "round 2: 2 instance(s)" in output
