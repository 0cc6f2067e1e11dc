"""The spotrun command line against the local cloud (moto with IAM enforced).

The admin client writes a run layout as the supervisor does: status, the events of a
run with one spot interruption, checkpoints and output. The CLI then runs as a
subprocess with a developer's environment that points at the local cloud.
"""

from __future__ import annotations

import io
import json
import math
import os
import queue
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from emulator.cloud import LocalCloud, free_port
from tests.conftest import make_client
from spotrun_cli.cost import PriceTable, average_spot_price, estimate_costs
from spotrun_cli.drill import RUN_TAG, find_experiment_template, start_drill
from spotrun_cli.aws import CliError
from spotrun_cli.timeline import (
    END_NEXT_INSTANCE,
    END_RECLAIM_TIME,
    END_STILL_RUNNING,
    instance_spans,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RUN = "cli-demo"
LIVE_RUN = "cli-live"
FIRST = "i-0aaaaaaaaaaaaaaa1"
SECOND = "i-0bbbbbbbbbbbbbbb2"
SECONDS_PER_STEP = 3.0
NOTICE_STEP = 206
INTERRUPTION_STEP = 209
FINAL_STEP = 675
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLI_TIMEOUT_S = 60


# Run layout -------------------------------------------------------------------------


def loss_at(step: int, noise: random.Random) -> float:
    return 2.3 * math.exp(-step / 120) + 0.05 + 0.03 * noise.random()


class RunWriter:
    """Writes objects under runs/RUN/ as the supervisor does."""

    def __init__(self, s3, bucket: str, run_id: str) -> None:
        self.s3, self.bucket, self.prefix = s3, bucket, f"runs/{run_id}/"

    def put(self, key: str, body: bytes | str) -> None:
        if isinstance(body, str):
            body = body.encode()
        self.s3.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=body)

    def put_json(self, key: str, document: dict) -> None:
        self.put(key, json.dumps(document, indent=2, sort_keys=True))

    def event(self, kind: str, instance_id: str, when: float, **fields) -> None:
        document = {"type": kind, "time": when, "instance_id": instance_id, **fields}
        self.put_json(f"events/{int(when * 1e9):020d}-{instance_id}-{kind}.json", document)


def write_completed_run(s3, bucket: str) -> dict:
    """Write a completed run with one interruption; return the facts the tests check."""
    writer = RunWriter(s3, bucket, RUN)
    noise = random.Random(0)
    start = time.time() - 45 * 60
    first_zone, second_zone = "us-east-1a", "us-east-1b"

    def step_time(instance_start: float, step: int, first_step: int) -> float:
        return instance_start + 20 + SECONDS_PER_STEP * (step - first_step)

    writer.event("instance_started", FIRST, start, instance_type="g5.xlarge",
                 availability_zone=first_zone, lease_generation=1)
    lines, losses = [], {}
    for step in range(1, INTERRUPTION_STEP + 1):
        losses[step] = loss_at(step, noise)
        lines.append({"step": step, "epoch": step // 45, "loss": losses[step], "lr": 1e-3,
                      "time": step_time(start, step, 1)})
        if step % 50 == 0:
            writer.event("checkpoint_committed", FIRST, step_time(start, step, 1) + 1,
                         step=step, epoch=step // 45, bytes=1_000_000)
    writer.put(f"metrics/progress-{FIRST}.jsonl",
               "".join(json.dumps(line) + "\n" for line in lines))
    notice_at = step_time(start, NOTICE_STEP, 1)
    writer.event("interruption_notice", FIRST, notice_at, action="terminate",
                 step_at_notice=NOTICE_STEP, notice_time=notice_at + 120)
    first_end = step_time(start, INTERRUPTION_STEP, 1) + 3
    writer.event("checkpoint_committed", FIRST, first_end - 1, step=INTERRUPTION_STEP,
                 epoch=4, bytes=1_000_000)
    writer.event("interruption_checkpoint", FIRST, first_end, step_at_notice=NOTICE_STEP,
                 checkpoint_step=INTERRUPTION_STEP, last_step=INTERRUPTION_STEP, steps_lost=0)

    second_start = notice_at + 150
    writer.event("instance_started", SECOND, second_start, instance_type="g5.xlarge",
                 availability_zone=second_zone, lease_generation=2)
    writer.event("resumed", SECOND, second_start + 10, step=INTERRUPTION_STEP, epoch=4)
    lines = []
    for step in range(INTERRUPTION_STEP + 1, FINAL_STEP + 1):
        losses[step] = loss_at(step, noise)
        when = step_time(second_start, step, INTERRUPTION_STEP + 1)
        lines.append({"step": step, "epoch": step // 45, "loss": losses[step], "lr": 1e-4,
                      "time": when})
        if step % 50 == 0 or step == FINAL_STEP:
            writer.event("checkpoint_committed", SECOND, when + 1, step=step,
                         epoch=step // 45, bytes=1_000_000)
    writer.put(f"metrics/progress-{SECOND}.jsonl",
               "".join(json.dumps(line) + "\n" for line in lines))
    end = step_time(second_start, FINAL_STEP, INTERRUPTION_STEP + 1) + 5

    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 10))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    metrics = {"run_id": RUN, "final_step": FINAL_STEP, "final_loss": losses[FINAL_STEP],
               "val_accuracy": 0.97, "epochs": 15}
    writer.put("output/model.pt", buffer.getvalue())
    writer.put_json("output/metrics.json", metrics)
    writer.put_json("checkpoints/latest.json", {"step": FINAL_STEP, "epoch": 15,
                                                "folder": "step-00000675",
                                                "instance_id": SECOND,
                                                "lease_generation": 2, "committed_at": end})
    writer.event("completed", SECOND, end, step=FINAL_STEP,
                 output_keys=[f"runs/{RUN}/output/model.pt"])
    writer.put_json("status.json", {
        "run_id": RUN, "state": "completed", "step": FINAL_STEP, "epoch": 15,
        "loss": losses[FINAL_STEP], "committed_step": FINAL_STEP,
        "resumed_from": INTERRUPTION_STEP, "instance_id": SECOND,
        "instance_type": "g5.xlarge", "availability_zone": second_zone, "updated_at": end,
        "instances_launched": 2, "interruptions": 1, "crashes": 0, "bootstrap_crashes": 0,
        "started_at": start})
    writer.put_json("DONE", {"run_id": RUN, "completed_at": end, "instance_id": SECOND,
                             "final_step": FINAL_STEP})
    hours = (first_end - start + end - second_start) / 3600
    return {"start": start, "end": end, "hours": hours, "model": buffer.getvalue(),
            "metrics": metrics, "final_loss": losses[FINAL_STEP]}


def write_live_run(s3, bucket: str) -> None:
    """Write a run that is still training, with no per-step history in S3."""
    writer = RunWriter(s3, bucket, LIVE_RUN)
    start = time.time() - 600
    writer.event("instance_started", FIRST, start, instance_type="g4dn.xlarge",
                 availability_zone="us-east-1a", lease_generation=1)
    writer.event("checkpoint_committed", FIRST, start + 300, step=50, epoch=1, bytes=10)
    writer.put_json("status.json", {
        "run_id": LIVE_RUN, "state": "training", "step": 80, "epoch": 1, "loss": 0.9,
        "committed_step": 50, "resumed_from": None, "instance_id": FIRST,
        "instance_type": "g4dn.xlarge", "availability_zone": "us-east-1a",
        "updated_at": time.time(), "instances_launched": 1, "interruptions": 0,
        "crashes": 0, "bootstrap_crashes": 0, "started_at": start})


# Fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCloud]:
    local_cloud = LocalCloud(tmp_path_factory.mktemp("cli-cloud"), PROJECT_ROOT)
    local_cloud.start()
    try:
        yield local_cloud
    finally:
        local_cloud.stop()


@pytest.fixture(scope="module")
def runs(cloud: LocalCloud) -> dict:
    """Create the run bucket with both runs, and the stack of the completed run."""
    s3 = cloud.client("s3")
    bucket = f"spotrun-cli-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    facts = write_completed_run(s3, bucket)
    write_live_run(s3, bucket)
    template = {
        "Resources": {"Logs": {"Type": "AWS::Logs::LogGroup",
                               "Properties": {"LogGroupName": f"/spotrun/{RUN}"}}},
        "Outputs": {"BucketName": {"Value": bucket}, "RunId": {"Value": RUN},
                    "GroupName": {"Value": f"spotrun-{RUN}"},
                    "LogGroupName": {"Value": f"/spotrun/{RUN}"}},
    }
    cloud.client("cloudformation").create_stack(StackName=f"Spotrun-{RUN}",
                                                TemplateBody=json.dumps(template))
    return {"bucket": bucket, **facts}


def cli_env(cloud: LocalCloud, **overrides: str | None) -> dict[str, str]:
    # No request may go to the instance metadata service while credentials are looked up.
    env = {**cloud.admin_env(), "AWS_EC2_METADATA_DISABLED": "true"}
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def spotrun(env: dict[str, str], *arguments: str, cwd: Path | None = None
            ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spotrun_cli", *arguments],
                          env={**env, "PYTHONPATH": str(PROJECT_ROOT)},
                          cwd=cwd or PROJECT_ROOT, capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S)


def assert_one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


# Commands ---------------------------------------------------------------------------


def test_status_json_matches_layout(cloud, runs):
    result = spotrun(cli_env(cloud), "status", RUN, "--json")

    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["state"] == "completed"
    assert summary["bucket"] == runs["bucket"]
    assert summary["stack"] == f"Spotrun-{RUN}"
    assert summary["step"] == FINAL_STEP
    assert summary["epoch"] == 15
    assert summary["loss"] == pytest.approx(runs["final_loss"])
    assert summary["committed_step"] == FINAL_STEP
    assert summary["instance_id"] == SECOND
    assert summary["instance_type"] == "g5.xlarge"
    assert summary["instances_launched"] == 2
    assert summary["interruptions"] == 1
    assert summary["crashes"] == 0
    assert summary["done"] is True
    assert summary["run_time_s"] == pytest.approx(runs["end"] - runs["start"], abs=1)
    details = summary["interruption_details"]
    assert [(d["step_at_notice"], d["checkpoint_step"], d["resumed_from"]) for d in details] \
        == [(NOTICE_STEP, INTERRUPTION_STEP, INTERRUPTION_STEP)]


def test_status_cost_uses_price_table(cloud, runs):
    summary = json.loads(spotrun(cli_env(cloud), "status", RUN, "--json").stdout)

    cost = summary["cost"]
    assert [row["instance_id"] for row in cost["instances"]] == [FIRST, SECOND]
    assert [row["end_reason"] for row in cost["instances"]] == [
        "interruption_checkpoint", "completed"]
    assert cost["hours"] == pytest.approx(runs["hours"], rel=1e-6)
    assert cost["on_demand_total"] == pytest.approx(runs["hours"] * 1.006, rel=1e-6)
    for row in cost["instances"]:
        assert row["on_demand_price_source"] == "price table, us-east-1"
        assert row["spot_price_source"].startswith("local cloud: no spot price history")


def test_status_text(cloud, runs):
    result = spotrun(cli_env(cloud), "status", RUN)

    assert result.returncode == 0, result.stderr
    assert f"step {FINAL_STEP} committed to S3" in result.stdout
    fields = dict(line.split(None, 1) for line in result.stdout.splitlines()
                  if line and not line.startswith(" "))
    assert fields["interruptions"] == "1"
    assert fields["state"] == "completed"
    assert f"{SECOND} (g5.xlarge, us-east-1b)" in result.stdout
    assert "on demand" in result.stdout


def test_status_without_stack_needs_bucket(cloud, runs):
    missing = spotrun(cli_env(cloud), "status", LIVE_RUN)
    found = spotrun(cli_env(cloud), "status", LIVE_RUN, "--json", "--bucket", runs["bucket"])

    line = assert_one_line_error(missing)
    assert f"no stack Spotrun-{LIVE_RUN}" in line
    assert "--bucket" in line
    assert found.returncode == 0, found.stderr
    summary = json.loads(found.stdout)
    assert summary["state"] == "training"
    assert summary["stack"] is None
    assert summary["cost"]["instances"][0]["end_reason"] == END_STILL_RUNNING
    assert summary["cost"]["instances"][0]["hours"] == pytest.approx(600 / 3600, rel=0.05)


def test_report_writes_charts(cloud, runs, tmp_path):
    out = tmp_path / "report"
    result = spotrun(cli_env(cloud), "report", RUN, "--out", str(out), "--link-images")

    assert result.returncode == 0, result.stderr
    for name in ("loss.png", "timeline.png"):
        image = (out / name).read_bytes()
        assert image.startswith(PNG_SIGNATURE), name
        assert len(image) > 10_000, f"{name} has only {len(image)} bytes"
    page = (out / "index.html").read_text()
    assert 'src="loss.png"' in page
    assert 'src="timeline.png"' in page
    assert "price table, us-east-1" in page
    assert "per-step history" in page


def test_report_embeds_images_by_default(cloud, runs, tmp_path):
    out = tmp_path / "embedded"
    result = spotrun(cli_env(cloud), "report", RUN, "--out", str(out))

    assert result.returncode == 0, result.stderr
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    assert 'src="loss.png"' not in page


def test_report_function_for_live_run(cloud, runs, tmp_path):
    from spotrun_cli import write_html_report

    page = write_html_report(cloud.client("s3"), runs["bucket"], LIVE_RUN, tmp_path)

    assert page == tmp_path / "index.html"
    text = page.read_text()
    assert "status.json and output/metrics.json only" in text
    assert (tmp_path / "loss.png").read_bytes().startswith(PNG_SIGNATURE)
    assert (tmp_path / "timeline.png").read_bytes().startswith(PNG_SIGNATURE)


def test_download_fetches_output(cloud, runs, tmp_path):
    out = tmp_path / "model"
    result = spotrun(cli_env(cloud), "download", RUN, "--out", str(out))

    assert result.returncode == 0, result.stderr
    assert (out / "model.pt").read_bytes() == runs["model"]
    assert json.loads((out / "metrics.json").read_text()) == runs["metrics"]
    state = torch.load(out / "model.pt", weights_only=True)
    assert state["0.weight"].shape == (32, 64)


def test_download_before_output_exists(cloud, runs, tmp_path):
    result = spotrun(cli_env(cloud), "download", LIVE_RUN, "--bucket", runs["bucket"],
                     "--out", str(tmp_path / "none"))

    assert result.returncode == 1
    assert "no output yet (state: training)" in result.stderr
    assert not (tmp_path / "none").exists()


def test_logs_print_events(cloud, runs):
    logs = cloud.client("logs")
    group = f"/spotrun/{RUN}"
    logs.create_log_stream(logGroupName=group, logStreamName=f"{FIRST}/supervisor")
    now_ms = int(time.time() * 1000)
    logs.put_log_events(logGroupName=group, logStreamName=f"{FIRST}/supervisor", logEvents=[
        {"timestamp": now_ms - 2000, "message": "holding run lease generation 1"},
        {"timestamp": now_ms - 1000, "message": "checkpoint step 50 committed to S3"},
    ])

    result = spotrun(cli_env(cloud), "logs", RUN)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith(f"{FIRST}/supervisor holding run lease generation 1")
    assert lines[1].endswith("checkpoint step 50 committed to S3")


def test_logs_group_without_streams(cloud, runs):
    cloud.client("logs").create_log_group(logGroupName=f"/spotrun/{LIVE_RUN}")

    result = spotrun(cli_env(cloud), "logs", LIVE_RUN, "--bucket", runs["bucket"])

    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "has no log streams yet" in lines[0]


def test_logs_follow_prints_new_events(cloud, runs):
    logs = cloud.client("logs")
    group, stream = f"/spotrun/{RUN}", f"{SECOND}/trainer"
    logs.create_log_stream(logGroupName=group, logStreamName=stream)
    env = {**cli_env(cloud), "PYTHONPATH": str(PROJECT_ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "spotrun_cli", "logs", RUN, "--follow", "--interval", "0.3"],
        env=env, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout],
                     daemon=True).start()

    def wait_for(text: str, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if text in lines.get(timeout=0.5):
                    return
            except queue.Empty:
                continue
        raise AssertionError(f"{text!r} not printed within {timeout_s} s")

    try:
        logs.put_log_events(logGroupName=group, logStreamName=stream, logEvents=[
            {"timestamp": int(time.time() * 1000), "message": "first followed line"}])
        wait_for("first followed line")
        logs.put_log_events(logGroupName=group, logStreamName=stream, logEvents=[
            {"timestamp": int(time.time() * 1000), "message": "second followed line"}])
        wait_for("second followed line")
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_drill_on_local_cloud_prints_scenario(cloud, runs):
    result = spotrun(cli_env(cloud), "drill", RUN)

    assert result.returncode == 2
    assert "python -m emulator run --scenario" in result.stderr
    assert f'"run_name": "{RUN}"' in result.stderr


# Errors -----------------------------------------------------------------------------


def test_unknown_run_is_one_line(cloud, runs):
    by_stack = spotrun(cli_env(cloud), "status", "no-such-run")
    by_bucket = spotrun(cli_env(cloud), "report", "no-such-run", "--bucket", runs["bucket"])

    assert "no stack Spotrun-no-such-run" in assert_one_line_error(by_stack)
    assert "not found in bucket" in assert_one_line_error(by_bucket)


def test_invalid_run_name_is_one_line(cloud):
    line = assert_one_line_error(spotrun(cli_env(cloud), "status", "Bad_Name"))

    assert "invalid run name 'Bad_Name'" in line


def test_unreachable_endpoint_is_one_line(cloud):
    endpoint = f"http://127.0.0.1:{free_port()}"

    line = assert_one_line_error(
        spotrun(cli_env(cloud, AWS_ENDPOINT_URL=endpoint), "status", RUN))

    assert f"could not connect to the AWS endpoint {endpoint}" in line


def test_missing_credentials_is_one_line(cloud):
    env = cli_env(cloud, AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None)

    line = assert_one_line_error(spotrun(env, "download", RUN))

    assert "no AWS credentials found" in line


def test_missing_region_is_one_line(cloud):
    env = cli_env(cloud, AWS_REGION=None, AWS_DEFAULT_REGION=None)

    line = assert_one_line_error(spotrun(env, "status", RUN))

    assert "no AWS region set" in line


# Library ----------------------------------------------------------------------------


def test_spot_price_from_ec2_history(cloud):
    ec2 = cloud.client("ec2")
    end = time.time()

    price = average_spot_price(ec2, "g5.xlarge", "us-east-1a", end - 3600, end)

    # moto 5.2 returns one placeholder price of 0.00001 for every type and zone.
    assert price is not None
    assert price.source == "EC2 spot price history"
    assert price.per_hour == pytest.approx(0.00001)


def test_costs_with_spot_history(cloud):
    spans = instance_spans([{"type": "instance_started", "time": time.time() - 3600,
                             "instance_id": "i-1", "instance_type": "g5.xlarge",
                             "availability_zone": "us-east-1a"}], None, now=time.time())

    costs = estimate_costs(spans, "us-east-1", PriceTable(), ec2=cloud.client("ec2"))

    assert costs.rows[0].spot.source == "EC2 spot price history"
    assert costs.spot_total == pytest.approx(0.00001, rel=1e-3)
    assert costs.savings_fraction == pytest.approx(1 - 0.00001 / 1.006)


def test_costs_fall_back_to_table_without_history():
    spans = instance_spans([{"type": "instance_started", "time": 0.0, "instance_id": "i-1",
                             "instance_type": "g4dn.xlarge", "availability_zone": "us-east-1a"},
                            {"type": "completed", "time": 7200.0, "instance_id": "i-1"}],
                           None, now=9999.0)

    costs = estimate_costs(spans, "eu-west-1", PriceTable())

    row = costs.rows[0]
    assert row.span.hours == pytest.approx(2.0)
    assert row.on_demand.per_hour == pytest.approx(0.526)
    assert row.on_demand.source == "price table, us-east-1 (no eu-west-1 entry)"
    assert row.spot_cost == pytest.approx(2 * 0.526)
    assert costs.savings_fraction is None


def test_spans_without_end_event():
    events = [
        {"type": "instance_started", "time": 0.0, "instance_id": "i-1"},
        {"type": "interruption_notice", "time": 100.0, "instance_id": "i-1",
         "notice_time": 220.0},
        {"type": "instance_started", "time": 300.0, "instance_id": "i-2"},
        {"type": "instance_started", "time": 400.0, "instance_id": "i-3"},
    ]

    spans = instance_spans(events, {"state": "training"}, now=1000.0)

    assert [(span.end, span.end_reason) for span in spans] == [
        (220.0, END_RECLAIM_TIME), (400.0, END_NEXT_INSTANCE), (1000.0, END_STILL_RUNNING)]


def test_drill_starts_tagged_fis_template(moto_endpoint):
    # moto 5.2 with IAM enforced rejects the signature of FIS GET requests
    # (SignatureDoesNotMatch), so this test uses the server without IAM enforcement.
    fis = make_client("fis", moto_endpoint)
    role_arn = "arn:aws:iam::123456789012:role/fis-drill"
    created = fis.create_experiment_template(
        clientToken=str(uuid.uuid4()), description="spot interruption drill",
        roleArn=role_arn, stopConditions=[{"source": "none"}],
        targets={"instances": {"resourceType": "aws:ec2:spot-instance",
                               "resourceTags": {"aws:autoscaling:groupName": f"spotrun-{RUN}"},
                               "selectionMode": "ALL"}},
        actions={"interrupt": {"actionId": "aws:ec2:send-spot-instance-interruptions",
                               "parameters": {"durationBeforeInterruption": "PT2M"},
                               "targets": {"SpotInstances": "instances"}}},
        tags={RUN_TAG: RUN})["experimentTemplate"]

    with pytest.raises(CliError, match="no AWS FIS experiment template tagged"):
        find_experiment_template(fis, "other-run")
    experiment = start_drill(fis, RUN)

    assert experiment["experimentTemplateId"] == created["id"]


def test_member_interruption_paired_after_leader_resume():
    from emulator.report import interruptions_from_events
    from spotrun_cli.timeline import interruptions

    # In a multi-node run the leader resumes before the member records its checkpoint.
    events = [
        {"type": "interruption_notice", "instance_id": "i-member", "time": 1.0,
         "action": "terminate", "step_at_notice": 160, "notice_time": 11.0},
        {"type": "resumed", "instance_id": "i-leader", "time": 2.0, "step": 161},
        {"type": "interruption_checkpoint", "instance_id": "i-member", "time": 2.5,
         "checkpoint_step": 161, "last_step": 161, "steps_lost": 0},
    ]
    for records in (interruptions_from_events(events), interruptions(events)):
        assert len(records) == 1
        assert records[0]["checkpoint_step"] == 161
        assert records[0]["resumed_from"] == 161
        assert records[0]["steps_lost"] == 0
