"""The run summary shared by `spotrun status` and the HTML report."""

from __future__ import annotations

import datetime as dt

from spotrun_cli.cost import CostSummary
from spotrun_cli.run import RunData
from spotrun_cli.timeline import interruptions

# States after which the run does not continue on a replacement instance.
FINAL_STATES = frozenset({"completed", "failed", "stopped"})


def build_summary(data: RunData, costs: CostSummary, now: float) -> dict:
    """Return the run's state, progress, counts, run time and cost as plain JSON values."""
    status = data.status or {}
    location = data.location

    started_at = status.get("started_at")
    if started_at is None and data.events:
        started_at = data.events[0].get("time")
    state = status.get("state") or "not started"
    end = status.get("updated_at") if state in FINAL_STATES else now
    run_time = None if started_at is None or end is None else max(0.0, end - started_at)

    committed_step = status.get("committed_step")
    if committed_step is None and data.latest_checkpoint:
        committed_step = data.latest_checkpoint.get("step")
    metrics = data.metrics or {}

    return {
        "run_id": location.run_id,
        "bucket": location.bucket,
        "stack": location.stack_name,
        "log_group": location.log_group,
        "state": state,
        "reason": status.get("reason"),
        "done": data.done is not None,
        "step": status.get("step"),
        "epoch": status.get("epoch"),
        "loss": status.get("loss"),
        "committed_step": committed_step,
        "resumed_from": status.get("resumed_from"),
        "instance_id": status.get("instance_id"),
        "instance_type": status.get("instance_type"),
        "availability_zone": status.get("availability_zone"),
        "instances_launched": status.get("instances_launched", 0),
        "interruptions": status.get("interruptions", 0),
        "crashes": status.get("crashes", 0),
        "bootstrap_crashes": status.get("bootstrap_crashes", 0),
        "started_at": started_at,
        "updated_at": status.get("updated_at"),
        "run_time_s": run_time,
        "final_step": metrics.get("final_step"),
        "final_loss": metrics.get("final_loss"),
        "val_accuracy": metrics.get("val_accuracy"),
        "output_keys": data.output_keys,
        "interruption_details": interruptions(data.events),
        "progress_source": data.progress_source,
        "cost": costs.to_dict(),
    }


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    text = f"{hours}:{minutes:02d}:{seconds:02d}"
    return f"{days}d {text}" if days else text


def format_time(timestamp: float | None) -> str:
    if timestamp is None:
        return "unknown"
    moment = dt.datetime.fromtimestamp(float(timestamp), dt.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def format_money(value: float | None) -> str:
    if value is None:
        return "unknown"
    return f"${value:.2f}" if value >= 1 else f"${value:.4f}"


def format_rate(value: float | None) -> str:
    return "unknown" if value is None else f"${value:.4f}/h"


def format_loss(value) -> str:
    return "none yet" if value is None else f"{float(value):.4g}"


def format_status(summary: dict) -> str:
    """Return the text of `spotrun status`: one fact per line, then one line per instance."""
    where = f"bucket {summary['bucket']}"
    if summary["stack"]:
        where += f", stack {summary['stack']}"
    state = summary["state"]
    if summary["reason"]:
        state += f" ({summary['reason']})"
    step = "none yet" if summary["step"] is None else str(summary["step"])
    if summary["epoch"] is not None:
        step += f" (epoch {summary['epoch']})"
    checkpoint = ("none committed yet" if summary["committed_step"] is None
                  else f"step {summary['committed_step']} committed to S3")
    instance = summary["instance_id"] or "none yet"
    if summary["instance_type"]:
        instance += f" ({summary['instance_type']}, {summary['availability_zone']})"

    cost = summary["cost"]
    cost_line = (f"{format_money(cost['spot_total'])} spot vs "
                 f"{format_money(cost['on_demand_total'])} on demand for "
                 f"{cost['hours']:.3f} instance-hours")
    if cost["savings_fraction"] is not None:
        cost_line += f" ({cost['savings_fraction']:.0%} less)"

    lines = [
        ("run", f"{summary['run_id']} ({where})"),
        ("state", state),
        ("step", step),
        ("loss", format_loss(summary["loss"])),
        ("checkpoint", checkpoint),
        ("instance", instance),
        ("instances", f"{summary['instances_launched']} launched"),
        ("interruptions", str(summary["interruptions"])),
        ("crashes", f"{summary['crashes']} trainer, {summary['bootstrap_crashes']} supervisor"),
        ("run time", f"{format_duration(summary['run_time_s'])} since "
                     f"{format_time(summary['started_at'])}"),
        ("cost so far", cost_line),
    ]
    if summary["done"]:
        lines.insert(2, ("output", f"final step {summary['final_step']}, final loss "
                                   f"{format_loss(summary['final_loss'])}; "
                                   f"`spotrun download {summary['run_id']}` fetches it"))

    width = max(len(label) for label, _ in lines) + 2
    text = [f"{label:<{width}}{value}" for label, value in lines]
    for row in cost["instances"]:
        text.append(
            f"  {row['instance_id']}  {row['instance_type']}  {row['availability_zone']}  "
            f"{row['hours']:.3f} h  spot {format_rate(row['spot_price_per_hour'])} "
            f"[{row['spot_price_source']}]  on demand "
            f"{format_rate(row['on_demand_price_per_hour'])} "
            f"[{row['on_demand_price_source']}]")
    return "\n".join(text)
