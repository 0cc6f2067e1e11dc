"""Find a run by name and read what its S3 prefix contains.

The layout is the one bootstrap/store.py writes under ``s3://BUCKET/runs/RUN_ID/``.
The per-step loss history is read from ``metrics/progress-<instance_id>.jsonl`` when the
supervisor uploaded it; otherwise the loss points come from status.json and
output/metrics.json.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import re
from dataclasses import dataclass, field

from botocore.exceptions import ClientError

from spotrun_cli.aws import Aws, CliError, error_code

log = logging.getLogger("spotrun.cli")

STACK_PREFIX = "Spotrun-"
# Same rule as run_name in stacks/config.py.
RUN_NAME_PATTERN = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?$")
PROGRESS_PREFIX = "metrics/progress-"
PROGRESS_SUFFIX = ".jsonl"
PROGRESS_FROM_HISTORY = "per-step history (metrics/progress-*.jsonl)"
PROGRESS_FROM_STATUS = "status.json and output/metrics.json only"
MISSING_CODES = ("404", "NoSuchKey", "NotFound")
EVENT_READ_THREADS = 8


@dataclass(frozen=True)
class RunLocation:
    """Bucket, S3 prefix, log group and stack of one run."""

    run_id: str
    bucket: str
    log_group: str
    stack_name: str | None  # None when the stack does not exist (any more)
    group_name: str | None

    @property
    def prefix(self) -> str:
        return f"runs/{self.run_id}/"


@dataclass
class RunData:
    """The contents of one run's S3 prefix that the commands show."""

    location: RunLocation
    status: dict | None
    events: list[dict]
    latest_checkpoint: dict | None
    metrics: dict | None
    done: dict | None
    output_keys: list[str]
    progress: list[dict] = field(default_factory=list)
    progress_source: str = PROGRESS_FROM_STATUS


def validate_run_name(run: str) -> None:
    if not RUN_NAME_PATTERN.match(run):
        raise CliError(f"invalid run name {run!r}: expected lowercase letters, digits and "
                       f"hyphens, 1-40 characters, as run_name in cdk.json")


def locate_run(aws: Aws, run: str, bucket: str | None = None) -> RunLocation:
    """Find a run from its stack ``Spotrun-<run>``, or in ``bucket`` once it is gone.

    An explicit ``bucket`` takes precedence over the stack's BucketName output. Raises
    CliError when neither the stack nor the bucket has the run.
    """
    validate_run_name(run)
    stack_name = STACK_PREFIX + run
    outputs = _stack_outputs(aws, stack_name, bucket_given=bucket is not None)
    if outputs is None and bucket is None:
        raise CliError(f"run {run!r} not found: no stack {stack_name} in region "
                       f"{aws.region}; if the stack was destroyed, pass --bucket with the "
                       f"run bucket (it is kept by default)")
    location = RunLocation(
        run_id=run,
        bucket=bucket or (outputs or {}).get("BucketName", ""),
        log_group=(outputs or {}).get("LogGroupName", f"/spotrun/{run}"),
        stack_name=stack_name if outputs is not None else None,
        group_name=(outputs or {}).get("GroupName"),
    )
    if not location.bucket:
        raise CliError(f"stack {stack_name} has no BucketName output; pass --bucket")
    has_objects = _prefix_has_objects(aws.client("s3"), location)
    if not has_objects and location.stack_name is None:
        raise CliError(f"run {run!r} not found in bucket {location.bucket}: nothing under "
                       f"{location.prefix}; check the run name with "
                       f"`aws s3 ls s3://{location.bucket}/runs/`")
    return location


def _stack_outputs(aws: Aws, stack_name: str, bucket_given: bool) -> dict[str, str] | None:
    try:
        stacks = aws.client("cloudformation").describe_stacks(StackName=stack_name)["Stacks"]
    except ClientError as error:
        message = error.response.get("Error", {}).get("Message", "")
        if error_code(error) == "ValidationError" and "does not exist" in message:
            return None
        if bucket_given and error_code(error) in ("AccessDenied", "AccessDeniedException"):
            log.warning("cannot read stack %s (%s); using the bucket given with --bucket",
                        stack_name, error_code(error))
            return None
        raise
    if not stacks:
        return None
    return {item["OutputKey"]: item["OutputValue"] for item in stacks[0].get("Outputs", [])}


def _prefix_has_objects(s3, location: RunLocation) -> bool:
    try:
        response = s3.list_objects_v2(Bucket=location.bucket, Prefix=location.prefix,
                                      MaxKeys=1)
    except ClientError as error:
        if error_code(error) == "NoSuchBucket":
            raise CliError(f"bucket {location.bucket} not found; check --bucket or the "
                           f"stack's BucketName output") from None
        raise
    return response.get("KeyCount", 0) > 0


# Reading ------------------------------------------------------------------------------


def get_json(s3, bucket: str, key: str) -> dict | None:
    """Return the JSON object stored at ``key``, or None when there is none."""
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as error:
        if error_code(error) in MISSING_CODES:
            return None
        raise
    return json.loads(body)


def list_keys(s3, bucket: str, prefix: str) -> list[str]:
    keys = []
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(item["Key"] for item in page.get("Contents", []))
    return sorted(keys)


def read_events(s3, bucket: str, run_id: str) -> list[dict]:
    """Return the run's lifecycle events, oldest first."""
    keys = list_keys(s3, bucket, f"runs/{run_id}/events/")
    with concurrent.futures.ThreadPoolExecutor(EVENT_READ_THREADS) as pool:
        events = [event for event in pool.map(lambda key: get_json(s3, bucket, key), keys)
                  if event is not None]
    events.sort(key=lambda event: float(event.get("time", 0)))
    return events


def read_progress_history(s3, bucket: str, run_id: str) -> list[dict]:
    """Return the progress lines of every instance, each with its ``instance_id``.

    Lines that are not JSON objects with a numeric ``step`` are skipped with a warning.
    """
    prefix = f"runs/{run_id}/{PROGRESS_PREFIX}"
    points = []
    for key in list_keys(s3, bucket, prefix):
        if not key.endswith(PROGRESS_SUFFIX):
            continue
        instance_id = key[len(prefix):-len(PROGRESS_SUFFIX)]
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode("utf-8", "replace")
        skipped = 0
        for line in body.splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            if not isinstance(record, dict) or not isinstance(record.get("step"), (int, float)):
                skipped += 1
                continue
            record.setdefault("instance_id", instance_id)
            points.append(record)
        if skipped:
            log.warning("skipped %d malformed line(s) in s3://%s/%s", skipped, bucket, key)
    points.sort(key=lambda point: (float(point.get("time") or 0), point["step"]))
    return points


def progress_from_status(status: dict | None, metrics: dict | None) -> list[dict]:
    """Return the loss points that status.json and metrics.json contain (at most two)."""
    points = []
    if status and status.get("step") is not None and status.get("loss") is not None:
        points.append({"step": status["step"], "loss": status["loss"],
                       "epoch": status.get("epoch"), "time": status.get("updated_at"),
                       "instance_id": status.get("instance_id")})
    if (metrics and metrics.get("final_step") is not None
            and metrics.get("final_loss") is not None
            and all(point["step"] != metrics["final_step"] for point in points)):
        points.append({"step": metrics["final_step"], "loss": metrics["final_loss"],
                       "time": None, "instance_id": status.get("instance_id") if status else None})
    return points


def read_run(s3, location: RunLocation, with_progress: bool = True) -> RunData:
    bucket, prefix = location.bucket, location.prefix
    status = get_json(s3, bucket, prefix + "status.json")
    metrics = get_json(s3, bucket, prefix + "output/metrics.json")
    data = RunData(
        location=location,
        status=status,
        events=read_events(s3, bucket, location.run_id),
        latest_checkpoint=get_json(s3, bucket, prefix + "checkpoints/latest.json"),
        metrics=metrics,
        done=get_json(s3, bucket, prefix + "DONE"),
        output_keys=list_keys(s3, bucket, prefix + "output/"),
    )
    if with_progress:
        history = read_progress_history(s3, bucket, location.run_id)
        if history:
            data.progress, data.progress_source = history, PROGRESS_FROM_HISTORY
        else:
            data.progress = progress_from_status(status, metrics)
    return data
