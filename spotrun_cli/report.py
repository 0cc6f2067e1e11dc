"""The HTML report of a run: loss curve, instance timeline and cost table.

Charts are drawn with matplotlib's Agg backend into PNG files in the output folder.
The page either embeds them as data URIs (the default, so index.html works alone) or
references the PNG files by relative path.
"""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path

from spotrun_cli.cost import CostSummary, PriceTable, estimate_costs
from spotrun_cli.run import PROGRESS_FROM_HISTORY, RunData, RunLocation, read_run
from spotrun_cli.summary import (
    build_summary,
    format_duration,
    format_loss,
    format_money,
    format_rate,
    format_time,
)
from spotrun_cli.timeline import InstanceSpan, instance_spans, interruptions

LOSS_IMAGE = "loss.png"
TIMELINE_IMAGE = "timeline.png"
PAGE_NAME = "index.html"
DPI = 110
INSTANCE_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2",
                   "#17becf", "#bcbd22")
NOTICE_COLOR = "#d62728"
RESUME_COLOR = "#2ca02c"
CHECKPOINT_COLOR = "#555555"


def write_html_report(s3, bucket: str, run_id: str, out_dir: str | Path, *,
                      ec2=None, region: str | None = None, prices: PriceTable | None = None,
                      embed_images: bool = True, log_group: str | None = None,
                      stack_name: str | None = None,
                      no_spot_reason: str = "spot price history not read") -> Path:
    """Write index.html, loss.png and timeline.png of a run into ``out_dir``.

    Reads the run from ``s3://bucket/runs/run_id/`` with the given client. With ``ec2``
    the spot hours are priced from the spot price history, otherwise at on-demand
    rates. Returns the path of index.html.
    """
    location = RunLocation(run_id=run_id, bucket=bucket,
                           log_group=log_group or f"/spotrun/{run_id}",
                           stack_name=stack_name, group_name=None)
    data = read_run(s3, location)
    now = time.time()
    spans = instance_spans(data.events, data.status, now)
    costs = estimate_costs(spans, region or s3.meta.region_name, prices or PriceTable(),
                           ec2=ec2, no_spot_reason=no_spot_reason)
    return render_report(data, spans, costs, Path(out_dir), now, embed_images)


def render_report(data: RunData, spans: list[InstanceSpan], costs: CostSummary,
                  out_dir: Path, now: float, embed_images: bool = True) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = build_summary(data, costs, now)
    plot_loss(data, out_dir / LOSS_IMAGE)
    plot_timeline(data, spans, out_dir / TIMELINE_IMAGE, now)
    page = out_dir / PAGE_NAME
    page.write_text(render_html(data, summary, costs, out_dir, embed_images),
                    encoding="utf-8")
    return page


# Charts -------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def _instance_colors(data: RunData, spans: list[InstanceSpan] | None = None) -> dict[str, str]:
    ordered = [span.instance_id for span in spans or []]
    for event in data.events:
        if event.get("type") == "instance_started" and event.get("instance_id") not in ordered:
            ordered.append(event.get("instance_id"))
    for point in data.progress:
        if point.get("instance_id") not in ordered:
            ordered.append(point.get("instance_id"))
    return {instance: INSTANCE_COLORS[index % len(INSTANCE_COLORS)]
            for index, instance in enumerate(ordered)}


def plot_loss(data: RunData, path: Path) -> None:
    """Draw the loss by step, one colour per instance, with notice and resume markers."""
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(figsize=(10, 4.8), dpi=DPI)
    colors = _instance_colors(data)
    points = [point for point in data.progress if point.get("loss") is not None]
    by_instance: dict[str, list[dict]] = {}
    for point in points:
        by_instance.setdefault(point.get("instance_id") or "unknown", []).append(point)
    for instance_id, series in by_instance.items():
        series.sort(key=lambda point: point["step"])
        steps = [point["step"] for point in series]
        losses = [point["loss"] for point in series]
        style = "-" if len(series) > 2 else "o"
        axes.plot(steps, losses, style, color=colors.get(instance_id, "#333333"),
                  linewidth=1.2, markersize=6, label=f"loss on {instance_id}")

    losses = [float(point["loss"]) for point in points]
    if losses and min(losses) > 0 and max(losses) / min(losses) > 20:
        axes.set_yscale("log")

    for index, record in enumerate(interruptions(data.events)):
        if record["step_at_notice"] is not None:
            axes.axvline(record["step_at_notice"], color=NOTICE_COLOR, linestyle="--",
                         linewidth=1.2,
                         label="spot notice" if index == 0 else None)
        if record["resumed_from"] is not None:
            axes.axvline(record["resumed_from"], color=RESUME_COLOR, linestyle=":",
                         linewidth=1.8,
                         label="resumed from checkpoint" if index == 0 else None)

    checkpoint_steps = sorted({int(event["step"]) for event in data.events
                               if event.get("type") == "checkpoint_committed"
                               and event.get("step") is not None})
    if checkpoint_steps:
        axes.plot(checkpoint_steps, [0.0] * len(checkpoint_steps), "|", markersize=10,
                  color=CHECKPOINT_COLOR, transform=axes.get_xaxis_transform(),
                  clip_on=False, label="checkpoint committed")

    axes.set_xlim(left=0)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("training loss")
    title = "Training loss"
    if data.progress_source != PROGRESS_FROM_HISTORY:
        title += " (no per-step history in S3: latest values from status.json and metrics.json)"
    axes.set_title(title, fontsize=11)
    axes.grid(True, alpha=0.3)
    if not points:
        axes.text(0.5, 0.5, "no loss reported yet", transform=axes.transAxes,
                  ha="center", va="center", fontsize=12, color="#666666")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="upper right", fontsize=9, framealpha=0.9)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    pyplot.close(figure)


def plot_timeline(data: RunData, spans: list[InstanceSpan], path: Path, now: float) -> None:
    """Draw one row per instance: its span, spot notice, reclaim time, end and checkpoints."""
    pyplot = _pyplot()
    height = 1.9 + 0.75 * max(1, len(spans))
    figure, axes = pyplot.subplots(figsize=(10, height), dpi=DPI)
    colors = _instance_colors(data, spans)
    origin = min([span.start for span in spans], default=now)
    last_end = max([span.end for span in spans], default=now)
    scale, unit = _time_unit(last_end - origin)

    def x(timestamp: float) -> float:
        return (timestamp - origin) / scale

    labels_done: set[str] = set()

    def label_once(label: str) -> str | None:
        if label in labels_done:
            return None
        labels_done.add(label)
        return label

    for row, span in enumerate(spans):
        y = len(spans) - 1 - row
        axes.barh(y, x(span.end) - x(span.start), left=x(span.start), height=0.45,
                  color=colors.get(span.instance_id, "#333333"), alpha=0.35)
        axes.plot([x(span.start)], [y], ">", color="black", markersize=8,
                  label=label_once("supervisor started"))
        for committed_at, _step in span.checkpoints:
            axes.plot([x(committed_at)], [y + 0.33], "|", color=CHECKPOINT_COLOR,
                      markersize=9, label=label_once("checkpoint committed"))
        if span.notice_at is not None:
            axes.plot([x(span.notice_at)], [y], "X", color=NOTICE_COLOR, markersize=10,
                      label=label_once("spot notice"))
        if span.reclaim_at is not None:
            axes.plot([x(span.reclaim_at)], [y], "v", color=NOTICE_COLOR, markersize=8,
                      markerfacecolor="none", label=label_once("announced reclaim time"))
        if span.ended:
            axes.plot([x(span.end)], [y], "s", color="black", markersize=7,
                      label=label_once("instance ended"))
        axes.annotate(_end_label(span) if span.ended else "running", (x(span.end), y),
                      textcoords="offset points", xytext=(6, -14), fontsize=8,
                      color="#333333")

    axes.set_yticks(range(len(spans)))
    axes.set_yticklabels([f"{span.instance_id}\n{span.instance_type or '?'}, "
                          f"{span.availability_zone or '?'}" for span in reversed(spans)],
                         fontsize=8)
    axes.set_ylim(-0.7, max(1, len(spans)) - 0.3)
    # A small margin keeps the first start marker clear of the axis.
    axes.set_xlim(left=-0.03 * max(x(last_end), 1.0))
    axes.set_xlabel(f"{unit} since the first instance started ({format_time(origin)})")
    axes.set_title("Instances and checkpoints", fontsize=11)
    axes.grid(True, axis="x", alpha=0.3)
    if not spans:
        axes.text(0.5, 0.5, "no instance has started yet", transform=axes.transAxes,
                  ha="center", va="center", fontsize=12, color="#666666")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    pyplot.close(figure)


def _time_unit(seconds: float) -> tuple[float, str]:
    if seconds >= 3 * 3600:
        return 3600.0, "hours"
    if seconds >= 180:
        return 60.0, "minutes"
    return 1.0, "seconds"


def _end_label(span: InstanceSpan) -> str:
    labels = {"interruption_checkpoint": "interrupted", "completed": "completed",
              "failed": "failed", "stopped": "stopped", "bootstrap_crash": "supervisor crashed"}
    return labels.get(span.end_reason, "end estimated")


# Page ---------------------------------------------------------------------------------


def _image_tag(out_dir: Path, name: str, alt: str, embed: bool) -> str:
    if embed:
        encoded = base64.b64encode((out_dir / name).read_bytes()).decode("ascii")
        source = f"data:image/png;base64,{encoded}"
    else:
        source = name
    return f'<img src="{html.escape(source)}" alt="{html.escape(alt)}">'


def _table(headers: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(header))}</th>" for header in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row)
                   + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _dash(value: object) -> object:
    return "-" if value is None else value


def _event_details(event: dict) -> str:
    skipped = {"type", "time", "instance_id", "log_tail", "output_keys"}
    return ", ".join(f"{key}={value}" for key, value in sorted(event.items())
                     if key not in skipped)


def render_html(data: RunData, summary: dict, costs: CostSummary, out_dir: Path,
                embed_images: bool) -> str:
    facts = [
        ["state", summary["state"] + (f" ({summary['reason']})" if summary["reason"] else "")],
        ["step", f"{_dash(summary['step'])} (epoch {_dash(summary['epoch'])})"],
        ["latest loss", format_loss(summary["loss"])],
        ["committed checkpoint", _dash(summary["committed_step"])],
        ["instance", f"{_dash(summary['instance_id'])} ({_dash(summary['instance_type'])}, "
                     f"{_dash(summary['availability_zone'])})"],
        ["instances launched", summary["instances_launched"]],
        ["interruptions", summary["interruptions"]],
        ["crashes", f"{summary['crashes']} trainer, {summary['bootstrap_crashes']} supervisor"],
        ["run time", f"{format_duration(summary['run_time_s'])} since "
                     f"{format_time(summary['started_at'])}"],
        ["bucket", f"s3://{summary['bucket']}/runs/{summary['run_id']}/"],
    ]
    if summary["done"]:
        facts.insert(1, ["final", f"step {summary['final_step']}, loss "
                                  f"{format_loss(summary['final_loss'])}, validation accuracy "
                                  f"{_dash(summary['val_accuracy'])}"])

    cost_rows = [[row.span.instance_id, row.span.instance_type, row.span.availability_zone,
                  f"{row.span.hours:.3f}", format_rate(row.spot.per_hour), row.spot.source,
                  format_money(row.spot_cost), format_rate(row.on_demand.per_hour),
                  row.on_demand.source, format_money(row.on_demand_cost), row.span.end_reason]
                 for row in costs.rows]
    savings = costs.savings_fraction
    cost_rows.append(["total", "", "", f"{costs.hours:.3f}", "", "",
                      format_money(costs.spot_total), "", "",
                      format_money(costs.on_demand_total),
                      "" if savings is None else f"spot is {savings:.0%} less"])
    interruption_rows = [[format_time(record["time"]), record["instance_id"],
                          _dash(record["step_at_notice"]), _dash(record["checkpoint_step"]),
                          _dash(record["steps_lost"]), _dash(record["resumed_from"]),
                          _dash(record["resumed_on"])]
                         for record in summary["interruption_details"]]
    event_rows = [[format_time(event.get("time")), event.get("instance_id"), event.get("type"),
                   _event_details(event)] for event in data.events]

    image_mode = ("embedded as data URIs" if embed_images
                  else f"referenced as {LOSS_IMAGE} and {TIMELINE_IMAGE} beside this page")
    title = f"spotrun run {summary['run_id']}"
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        _table(["", ""], facts),
        "<h2>Training loss</h2>",
        _image_tag(out_dir, LOSS_IMAGE, "training loss by step", embed_images),
        f"<p class=note>Loss source: {html.escape(summary['progress_source'])}.</p>",
        "<h2>Instances</h2>",
        _image_tag(out_dir, TIMELINE_IMAGE, "instance timeline", embed_images),
        "<h2>Cost</h2>",
        _table(["instance", "type", "zone", "hours", "spot price", "spot price source",
                "spot cost", "on-demand price", "on-demand price source", "on-demand cost",
                "end"], cost_rows),
        "<p class=note>Estimate in USD: instance hours from the supervisor's events times "
        "the prices above. Boot time before the supervisor started, EBS, S3 and data "
        "transfer are not included.</p>",
        "<h2>Interruptions</h2>",
        _table(["notice", "instance", "step at notice", "checkpoint step", "steps lost",
                "resumed from", "resumed on"], interruption_rows)
        if interruption_rows else "<p>None.</p>",
        f"<details><summary>Events ({len(event_rows)})</summary>",
        _table(["time", "instance", "event", "details"], event_rows),
        "</details>",
        f"<p class=note>Generated {html.escape(format_time(time.time()))}; images "
        f"{html.escape(image_mode)}.</p>",
    ]
    return (
        "<!DOCTYPE html>\n<html lang=en>\n<head>\n<meta charset=utf-8>\n"
        f"<title>{html.escape(title)}</title>\n<style>\n"
        "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1150px;"
        "color:#222;padding:0 1em}\n"
        "table{border-collapse:collapse;margin:.5em 0;font-size:.9em}\n"
        "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;"
        "vertical-align:top}\nth{background:#f3f3f3}\n"
        "img{max-width:100%;height:auto;border:1px solid #eee}\n"
        ".note{color:#555;font-size:.85em}\n</style>\n</head>\n<body>\n"
        + "\n".join(sections) + "\n</body>\n</html>\n"
    )
