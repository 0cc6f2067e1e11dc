"""The JSON report of one local-cloud run, built from the run's S3 prefix and the cloud."""

from __future__ import annotations

import io
import json
import logging

from botocore.exceptions import ClientError

from emulator.instances import Observation

log = logging.getLogger("spotrun.emulator")


def read_run(s3, bucket: str, run_id: str) -> dict:
    """Return status, events, metrics and DONE of a run, read with admin credentials."""
    prefix = f"runs/{run_id}/"

    def get_json(key: str) -> dict | None:
        try:
            body = s3.get_object(Bucket=bucket, Key=prefix + key)["Body"].read()
        except ClientError as error:
            if error.response["Error"]["Code"] in ("NoSuchKey", "404"):
                return None
            raise
        return json.loads(body)

    events = []
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix + "events/"):
        for item in page.get("Contents", []):
            events.append(json.loads(s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()))
    events.sort(key=lambda event: event["time"])
    return {"status": get_json("status.json"), "events": events,
            "metrics": get_json("output/metrics.json"), "done": get_json("DONE")}


def final_weights_sha256(s3, bucket: str, run_id: str) -> str | None:
    """Hash the final model in S3 independently of what the trainer reported."""
    import torch

    from ml.checkpoint import state_dict_sha256

    try:
        body = s3.get_object(Bucket=bucket, Key=f"runs/{run_id}/output/model.pt")["Body"].read()
    except ClientError as error:
        if error.response["Error"]["Code"] in ("NoSuchKey", "404"):
            return None
        raise
    state = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    return state_dict_sha256(state)


def interruptions_from_events(events: list[dict]) -> list[dict]:
    """Pair each notice with the checkpoint saved for it and the step resumed from."""
    interruptions = []
    for index, event in enumerate(events):
        if event["type"] != "interruption_notice":
            continue
        record = {"instance_id": event["instance_id"], "action": event.get("action"),
                  "step_at_notice": event.get("step_at_notice"), "checkpoint_step": None,
                  "last_step": None, "steps_lost": None, "resumed_from": None}
        for later in events[index + 1:]:
            if (later["type"] == "interruption_checkpoint"
                    and later["instance_id"] == event["instance_id"]
                    and record["checkpoint_step"] is None):
                record["checkpoint_step"] = later.get("checkpoint_step")
                record["last_step"] = later.get("last_step")
                record["steps_lost"] = later.get("steps_lost")
            # In a multi-node run the leader may resume before the interrupted member
            # records its checkpoint, so look for both events.
            if (later["type"] == "resumed" and later["instance_id"] != event["instance_id"]
                    and record["resumed_from"] is None):
                record["resumed_from"] = later.get("step")
            if record["resumed_from"] is not None and record["checkpoint_step"] is not None:
                break
        if record["steps_lost"] is None and record["step_at_notice"] is not None:
            # Killed before it could record its checkpoint: the work after the step
            # the next instance resumed from is lost.
            resumed = record["resumed_from"] or 0
            record["steps_lost"] = max(0, record["step_at_notice"] - resumed)
        interruptions.append(record)
    return interruptions


def build_report(*, run: dict, observation: Observation, weights_sha256: str | None,
                 desired_capacity: int, running_instances: int, stack_deleted: bool,
                 duration_s: float, scenario_description: str) -> dict:
    status = run["status"] or {}
    metrics = run["metrics"] or {}
    state = status.get("state")
    completed = run["done"] is not None and state == "completed"
    if weights_sha256 and metrics.get("final_weights_sha256") not in (None, weights_sha256):
        log.error("the trainer reported weights %s but the model in S3 hashes to %s",
                  metrics.get("final_weights_sha256"), weights_sha256)
        completed = False
    return {
        "scenario": scenario_description,
        "status": "completed" if completed else "failed",
        "run_state": state,
        "reason": status.get("reason"),
        "instances_launched": len(observation.instances),
        "interruptions": interruptions_from_events(run["events"]),
        "ending": status.get("ending"),
        "crashes": status.get("crashes", 0),
        "bootstrap_crashes": status.get("bootstrap_crashes", 0),
        "log_tail": status.get("log_tail", []),
        "final_step": metrics.get("final_step", status.get("step")),
        "final_loss": metrics.get("final_loss"),
        "val_accuracy": metrics.get("val_accuracy"),
        "final_weights_sha256": weights_sha256,
        "asg_desired_capacity_at_end": desired_capacity,
        "running_instances_at_end": running_instances,
        "stack_deleted": stack_deleted,
        "timed_out": observation.timed_out,
        "duration_s": round(duration_s, 1),
        "instances": observation.instances,
        "notices_sent": observation.notices_sent,
        "faults_injected": observation.faults_injected,
        "events": [{key: value for key, value in event.items() if key != "log_tail"}
                   for event in run["events"]],
    }
