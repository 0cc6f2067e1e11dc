"""The supervisor in-process against the moto server and an IMDS emulator on loopback.

The training command is tests/fake_trainer.py, which follows ml/contract.py without
torch, so each run takes a few seconds. The supervisor gets its AWS credentials the way
it does on EC2: botocore's default chain reads the role credentials from the emulated
IMDS (AWS_EC2_METADATA_SERVICE_ENDPOINT) and calls the moto server (AWS_ENDPOINT_URL).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from bootstrap import supervisor as supervisor_module
from bootstrap.cluster import Round
from bootstrap.config import RunConfig
from bootstrap.imds import ImdsClient
from bootstrap.store import RunStore
from bootstrap.supervisor import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RUN_FAILED,
    Supervisor,
)
from emulator.imds import ImdsEmulator, InstanceDescription, RoleCredentials
from ml import contract
from tests.conftest import (
    DUMMY_ACCESS_KEY,
    DUMMY_SECRET_KEY,
    REGION,
    REPO_ROOT,
    make_client,
)
from tests.fake_trainer import commit_checkpoint

RUN_ID = "run-supervisor"
ROLE_NAME = "spotrun-instance"
CHECKPOINT_EVERY = 5
RUN_TIMEOUT_S = 30.0


def dummy_role_credentials() -> RoleCredentials:
    return RoleCredentials(access_key_id=DUMMY_ACCESS_KEY,
                           secret_access_key=DUMMY_SECRET_KEY,
                           session_token="testing-session-token",
                           expiration=datetime.now(timezone.utc) + timedelta(hours=1))


class RunHarness:
    """One run's bucket, Auto Scaling group and instances, as the stack would set them up."""

    def __init__(self, s3_bucket, endpoint: str, root: Path,
                 monkeypatch: pytest.MonkeyPatch) -> None:
        self.s3, self.bucket = s3_bucket
        self.monkeypatch = monkeypatch
        self.root = root
        self.autoscaling = make_client("autoscaling", endpoint)
        self.ec2 = make_client("ec2", endpoint)
        self.group_name = f"spotrun-{uuid.uuid4().hex[:12]}"
        self.store = RunStore(self.s3, self.bucket, RUN_ID)
        self.starts_file = root / "starts.jsonl"
        self.emulators: list[ImdsEmulator] = []
        self.s3.put_object(Bucket=self.bucket, Key="data/digits/train.csv", Body=b"x,y\n1,2\n")
        self._create_group()

    def _create_group(self) -> None:
        image_id = self.ec2.describe_images()["Images"][0]["ImageId"]
        self.ec2.create_launch_template(
            LaunchTemplateName=self.group_name,
            LaunchTemplateData={"ImageId": image_id, "InstanceType": "t3.micro"})
        self.autoscaling.create_auto_scaling_group(
            AutoScalingGroupName=self.group_name,
            LaunchTemplate={"LaunchTemplateName": self.group_name, "Version": "$Latest"},
            MinSize=0, MaxSize=1, DesiredCapacity=1, AvailabilityZones=[f"{REGION}a"])

    def config(self, *trainer_args: str, **overrides) -> RunConfig:
        command = ["{python}", "-m", "tests.fake_trainer", "--starts-file",
                   str(self.starts_file), *trainer_args]
        settings = {
            "run_id": RUN_ID, "region": REGION, "bucket": self.bucket,
            "group_name": self.group_name,
            "data_prefix_uri": f"s3://{self.bucket}/data/digits",
            "train_command": command, "checkpoint_every_steps": CHECKPOINT_EVERY,
            "keep_checkpoints": 2, "poll_interval_seconds": 0.2,
            "max_crash_restarts": 2, "lease_ttl_seconds": 30.0,
            **overrides,
        }
        return RunConfig(**settings)

    def start_instance(self, instance_id: str) -> ImdsEmulator:
        instance = InstanceDescription(
            instance_id=instance_id, instance_type="g5.xlarge", ami_id="ami-0123456789abcdef0",
            availability_zone=f"{REGION}a", region=REGION, private_ip="10.0.1.10",
            role_name=ROLE_NAME, user_data=None, account_id="123456789012")
        emulator = ImdsEmulator(instance, credentials_source=dummy_role_credentials)
        emulator.start()
        self.emulators.append(emulator)
        return emulator

    def supervisor(self, emulator: ImdsEmulator, config: RunConfig) -> Supervisor:
        """Build the supervisor as ``python -m bootstrap`` does, after IMDS is set up."""
        self.monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", emulator.base_url)
        imds = ImdsClient(emulator.base_url)
        identity = imds.instance_identity()
        work_dir = self.root / identity.instance_id
        work_dir.mkdir()
        return Supervisor(config, imds, identity, work_dir, code_dir=REPO_ROOT)

    def stop(self) -> None:
        for emulator in self.emulators:
            emulator.stop()

    # Observations -------------------------------------------------------------------

    def desired_capacity(self) -> int:
        groups = self.autoscaling.describe_auto_scaling_groups(
            AutoScalingGroupNames=[self.group_name])["AutoScalingGroups"]
        return groups[0]["DesiredCapacity"]

    def starts(self) -> list[dict]:
        if not self.starts_file.exists():
            return []
        lines = self.starts_file.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines]

    def events(self, kind: str) -> list[dict]:
        return [event for event in self.store.list_events() if event["type"] == kind]

    def read_json(self, key: str) -> dict:
        body = self.s3.get_object(Bucket=self.bucket, Key=self.store.prefix + key)["Body"]
        return json.loads(body.read())

    def has_key(self, key: str) -> bool:
        response = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=self.store.prefix + key)
        return any(item["Key"] == self.store.prefix + key
                   for item in response.get("Contents", []))


class SupervisorThread(threading.Thread):
    """Run ``Supervisor.run`` in the background and keep its exit code or error."""

    def __init__(self, supervisor: Supervisor) -> None:
        super().__init__(name="supervisor-under-test", daemon=True)
        self.supervisor = supervisor
        self.exit_code: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.exit_code = self.supervisor.run()
        except BaseException as error:  # noqa: BLE001 - checked by the test thread
            self.error = error

    def result(self, timeout_s: float = RUN_TIMEOUT_S) -> int:
        self.join(timeout_s)
        assert not self.is_alive(), f"the supervisor did not exit within {timeout_s} s"
        if self.error is not None:
            raise self.error
        return self.exit_code


def run_supervisor(supervisor: Supervisor) -> int:
    thread = SupervisorThread(supervisor)
    thread.start()
    return thread.result()


def wait_for(condition, timeout_s: float, description: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, (
            f"timed out after {timeout_s} s waiting for {description}")
        time.sleep(0.05)


def progress_steps(supervisor: Supervisor) -> list[int]:
    if not supervisor.progress_path.exists():
        return []
    lines = supervisor.progress_path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["step"] for line in lines if line.strip()]


@pytest.fixture
def harness(s3_bucket, moto_endpoint, tmp_path, monkeypatch):
    # Credentials must come from IMDS as on EC2, so no key may be found earlier in
    # botocore's chain.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_PROFILE", "AWS_EC2_METADATA_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setattr(supervisor_module, "STATUS_EVERY_S", 0.5)
    run = RunHarness(s3_bucket, moto_endpoint, tmp_path, monkeypatch)
    yield run
    run.stop()


def test_completion_marks_done(harness):
    config = harness.config("--total-steps", "12")
    emulator = harness.start_instance("i-0000000000000001a")
    supervisor = harness.supervisor(emulator, config)
    assert harness.desired_capacity() == 1

    exit_code = run_supervisor(supervisor)

    assert exit_code == EXIT_OK
    credential_reads = [record for record in emulator.request_log()
                        if record.path.endswith(f"/iam/security-credentials/{ROLE_NAME}")]
    assert credential_reads, "the supervisor did not read its credentials from IMDS"
    assert all(record.status == 200 for record in credential_reads)
    assert harness.store.is_done()
    done = harness.read_json("DONE")
    assert done["final_step"] == 12
    assert done["instance_id"] == "i-0000000000000001a"
    status = harness.store.read_status()
    assert status["state"] == "completed"
    assert status["step"] == 12
    assert status["committed_step"] == 10
    assert harness.read_json("output/metrics.json") == {"final_step": 12, "loss": 1.0 / 12}
    assert harness.has_key("output/model.bin")
    assert harness.store.latest_step() == 10
    assert not harness.has_key("lease.json")
    assert harness.desired_capacity() == 0
    assert [start["resume_from"] for start in harness.starts()] == [""]
    completed = harness.events("completed")
    assert len(completed) == 1
    assert sorted(completed[0]["output_keys"]) == [
        f"runs/{RUN_ID}/output/metrics.json", f"runs/{RUN_ID}/output/model.bin"]


def test_done_run_exits_at_once(harness):
    harness.store.mark_done({"run_id": RUN_ID, "final_step": 12})
    config = harness.config("--total-steps", "12")
    supervisor = harness.supervisor(harness.start_instance("i-0000000000000002a"), config)

    started = time.monotonic()
    exit_code = run_supervisor(supervisor)

    assert exit_code == EXIT_OK
    assert time.monotonic() - started < 10
    assert harness.desired_capacity() == 0
    assert harness.starts() == []
    assert not harness.has_key("lease.json")
    assert harness.store.read_status() is None


def test_spot_notice_commits_then_resumes(harness):
    config = harness.config("--total-steps", "60", "--step-seconds", "0.05")
    emulator = harness.start_instance("i-0000000000000003a")
    first = harness.supervisor(emulator, config)
    thread = SupervisorThread(first)
    thread.start()
    wait_for(lambda: harness.store.latest_step() is not None, RUN_TIMEOUT_S,
             "the first periodic checkpoint in S3")
    wait_for(lambda: max(progress_steps(first), default=0) >= 8, RUN_TIMEOUT_S,
             "step 8 of the first trainer")

    published_at = time.time()
    notice_time = (datetime.now(timezone.utc) + timedelta(seconds=20)).replace(microsecond=0)
    emulator.publish_instance_action("terminate", at=notice_time)
    exit_code = thread.result()

    assert exit_code == EXIT_INTERRUPTED
    latest = harness.read_json("checkpoints/latest.json")
    assert published_at <= latest["committed_at"] < notice_time.timestamp()
    assert latest["instance_id"] == "i-0000000000000003a"
    notices = harness.events("interruption_notice")
    assert len(notices) == 1
    assert notices[0]["action"] == "terminate"
    assert notices[0]["notice_time"] == notice_time.timestamp()
    endings = harness.events("interruption_checkpoint")
    assert len(endings) == 1
    assert endings[0]["steps_lost"] == 0
    assert endings[0]["checkpoint_step"] == latest["step"]
    assert endings[0]["last_step"] == latest["step"]
    assert endings[0]["step_at_notice"] <= latest["step"]
    assert max(progress_steps(first)) == latest["step"]
    assert not harness.has_key("lease.json")
    status = harness.store.read_status()
    assert status["state"] == "interrupted"
    assert status["interruptions"] == 1
    assert harness.desired_capacity() == 1
    interrupted_step = latest["step"]
    assert interrupted_step < 60

    second = harness.supervisor(harness.start_instance("i-0000000000000003b"), config)
    exit_code = run_supervisor(second)

    assert exit_code == EXIT_OK
    starts = harness.starts()
    assert len(starts) == 2
    expected_resume = second.checkpoint_dir / contract.step_folder_name(interrupted_step)
    assert starts[1]["resume_from"] == str(expected_resume)
    assert progress_steps(second)[0] == interrupted_step + 1
    resumed = harness.events("resumed")
    assert [event["step"] for event in resumed] == [interrupted_step]
    status = harness.store.read_status()
    assert status["state"] == "completed"
    assert status["resumed_from"] == interrupted_step
    assert status["instances_launched"] == 2
    assert status["interruptions"] == 1
    assert harness.read_json("DONE")["final_step"] == 60
    assert harness.desired_capacity() == 0


def test_crash_loop_fails_run(harness):
    config = harness.config("--total-steps", "20", "--crash-at-step", "0",
                            max_crash_restarts=2)
    supervisor = harness.supervisor(harness.start_instance("i-0000000000000004a"), config)

    exit_code = run_supervisor(supervisor)

    assert exit_code == EXIT_RUN_FAILED
    status = harness.store.read_status()
    assert status["state"] == "failed"
    assert "max_crash_restarts" in status["reason"]
    assert status["crashes"] == 3
    assert any("simulated crash at step 0" in line for line in status["log_tail"])
    assert len(harness.starts()) == 3
    assert len(harness.events("trainer_crash")) == 3
    assert len(harness.events("failed")) == 1
    assert harness.desired_capacity() == 0
    assert not harness.store.is_done()
    assert not harness.has_key("lease.json")


def test_single_crash_restarts_in_place(harness, tmp_path):
    config = harness.config("--total-steps", "20", "--crash-at-step", "7",
                            "--crash-marker", str(tmp_path / "crashed-once"))
    supervisor = harness.supervisor(harness.start_instance("i-0000000000000005a"), config)

    exit_code = run_supervisor(supervisor)

    assert exit_code == EXIT_OK
    starts = harness.starts()
    assert len(starts) == 2
    assert starts[0]["resume_from"] == ""
    assert starts[1]["resume_from"] == str(supervisor.checkpoint_dir / "step-00000005")
    crashes = harness.events("trainer_crash")
    assert len(crashes) == 1
    assert crashes[0]["exit_code"] == 1
    assert crashes[0]["step"] == 7
    status = harness.store.read_status()
    assert status["state"] == "completed"
    assert status["crashes"] == 1
    assert harness.read_json("DONE")["final_step"] == 20
    assert harness.store.latest_step() == 20
    assert harness.desired_capacity() == 0


def test_torn_step_is_uploaded_again(harness, tmp_path):
    previous = harness.store.try_acquire_lease("i-0000000000000006a", 60.0)
    local_dir = tmp_path / "previous-instance"
    for step in (10, 20):
        commit_checkpoint(local_dir, RUN_ID, step)
        folder = local_dir / contract.step_folder_name(step)
        manifest = contract.read_verified_manifest(folder)
        previous = harness.store.upload_checkpoint(folder, manifest, previous)
    harness.store.release_lease(previous)
    harness.s3.put_object(Bucket=harness.bucket,
                          Key=f"{harness.store.prefix}checkpoints/step-00000020/weights.bin",
                          Body=b"truncated")
    config = harness.config("--total-steps", "22")
    supervisor = harness.supervisor(harness.start_instance("i-0000000000000006b"), config)

    exit_code = run_supervisor(supervisor)

    assert exit_code == EXIT_OK
    assert harness.starts()[0]["resume_from"] == str(supervisor.checkpoint_dir / "step-00000010")
    committed = [event["step"] for event in harness.events("checkpoint_committed")]
    assert committed == [15, 20]
    assert harness.store.latest_step() == 20
    restored = harness.store.download_newest_checkpoint(tmp_path / "restore")
    assert restored is not None
    assert restored.step == 20


def test_lost_lease_stops_without_writes(harness):
    config = harness.config("--total-steps", "400", "--step-seconds", "0.05",
                            lease_ttl_seconds=10.0)
    emulator = harness.start_instance("i-0000000000000008a")
    supervisor = harness.supervisor(emulator, config)
    thread = SupervisorThread(supervisor)
    thread.start()
    wait_for(lambda: len(progress_steps(supervisor)) >= 5, 30, "the trainer to start")

    # Another instance takes the lease over, as after a long network partition.
    current = harness.read_json("lease.json")
    harness.s3.put_object(
        Bucket=harness.bucket, Key=harness.store.prefix + "lease.json",
        Body=json.dumps({"instance_id": "i-0000000000000008b",
                         "generation": current["generation"] + 1,
                         "renewed_at": time.time()}).encode())
    exit_code = thread.result()

    assert exit_code == supervisor_module.EXIT_LEASE_BUSY
    assert supervisor.trainer.poll() is not None, "the trainer must be stopped"
    assert harness.read_json("lease.json")["instance_id"] == "i-0000000000000008b"
    assert not harness.store.is_done()
    assert harness.desired_capacity() == 1


def test_power_off_commits_checkpoint_and_releases_lease(harness):
    config = harness.config("--total-steps", "400", "--step-seconds", "0.05")
    emulator = harness.start_instance("i-0000000000000009a")
    supervisor = harness.supervisor(emulator, config)
    thread = SupervisorThread(supervisor)
    thread.start()
    wait_for(lambda: len(progress_steps(supervisor)) >= 15, 30, "the trainer to reach step 15")

    supervisor.request_shutdown()  # what the SIGTERM handler of `python -m bootstrap` does
    exit_code = thread.result()

    assert exit_code == supervisor_module.EXIT_INTERRUPTED
    notices = harness.events("interruption_notice")
    assert [notice["action"] for notice in notices] == ["shutdown"]
    saved = harness.events("interruption_checkpoint")
    assert len(saved) == 1
    assert saved[0]["steps_lost"] == 0
    assert harness.store.latest_step() == saved[0]["checkpoint_step"]
    assert saved[0]["checkpoint_step"] >= notices[0]["step_at_notice"]
    assert not harness.has_key("lease.json")
    assert harness.store.read_status()["state"] == "interrupted"
    assert harness.desired_capacity() == 1


# Multi-node round membership ----------------------------------------------------------


class RecordingTrainer:
    """Stands in for a running trainer: records signals and kills."""

    def __init__(self) -> None:
        self.signals: list[int] = []
        self.killed = False

    def send(self, signal_number: int) -> int:
        self.signals.append(signal_number)
        return 1

    def kill(self) -> None:
        self.killed = True

    def poll(self) -> int | None:
        return -9 if self.killed else None


def multi_node_supervisor(harness, instance_id: str, round_members: tuple[str, ...],
                          *, leader: bool) -> Supervisor:
    config = harness.config(nodes=2, min_nodes=1)
    supervisor = harness.supervisor(harness.start_instance(instance_id), config)
    supervisor.is_leader = leader
    supervisor.trainer = RecordingTrainer()
    leader_id = instance_id if leader else "i-00000000000000leader"
    supervisor.round = Round(number=1, endpoint="10.0.1.10:29500", leader=leader_id,
                             members=round_members, resume_step=None)
    return supervisor


def test_leader_ends_round_for_waiting_member(harness):
    supervisor = multi_node_supervisor(harness, "i-00000000000000011", (), leader=True)
    supervisor._first_step_seen = True
    harness.store.register_member("i-00000000000000012", "10.0.1.12")

    supervisor._check_round_membership()

    assert supervisor.trainer.signals == [contract.SIGNAL_SAVE_AND_EXIT]
    assert supervisor._round_end_requested


def test_full_round_ignores_waiting_member(harness):
    supervisor = multi_node_supervisor(harness, "i-00000000000000013",
                                       ("i-00000000000000014",), leader=True)
    supervisor._first_step_seen = True
    for member in ("i-00000000000000014", "i-00000000000000015"):
        harness.store.register_member(member, "10.0.1.14")

    supervisor._check_round_membership()

    assert supervisor.trainer.signals == []
    assert not supervisor._round_end_requested


def test_leader_abandons_round_of_vanished_member(harness):
    supervisor = multi_node_supervisor(harness, "i-00000000000000016",
                                       ("i-00000000000000017",), leader=True)

    supervisor._check_round_membership()

    assert supervisor.trainer.killed
    assert supervisor._round_abandoned


def test_member_stops_round_the_leader_replaced(harness):
    supervisor = multi_node_supervisor(harness, "i-00000000000000018",
                                       ("i-00000000000000018",), leader=False)
    harness.store.publish_rendezvous(
        Round(number=2, endpoint="10.0.1.10:29501", leader="i-00000000000000leader",
              members=("i-00000000000000019",), resume_step=40).to_dict())

    supervisor._check_round_membership()

    assert supervisor.trainer.killed
    assert supervisor._round_abandoned
    assert "i-00000000000000018" in harness.store.fresh_members(60.0)
