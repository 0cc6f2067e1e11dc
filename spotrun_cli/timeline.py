"""Instance lifetimes and interruptions, derived from a run's lifecycle events."""

from __future__ import annotations

from dataclasses import dataclass, field

# Events after which the supervisor powers its instance off.
ENDING_EVENTS = frozenset({"interruption_checkpoint", "completed", "failed", "stopped",
                           "bootstrap_crash"})
# Run states in which no instance of the run is training any more.
ENDED_STATES = frozenset({"completed", "failed", "stopped", "interrupted"})

END_STILL_RUNNING = "still running (counted until now)"
END_NEXT_INSTANCE = "no end event; counted until the next instance started"
END_RECLAIM_TIME = "no end event; counted until the reclaim time of its spot notice"
END_STATUS_UPDATE = "no end event; counted until the last status update"


@dataclass
class InstanceSpan:
    """One instance's time in the run, from the supervisor's instance_started event.

    Time before that event (EC2 launch, boot, code download) is not in the span.
    """

    instance_id: str
    instance_type: str | None
    availability_zone: str | None
    start: float  # Unix time
    end: float  # Unix time
    end_reason: str  # the ending event type, or one of the END_* descriptions
    notice_at: float | None = None  # time of the interruption_notice event
    reclaim_at: float | None = None  # time EC2 announced it reclaims the instance
    checkpoints: list[tuple[float, int]] = field(default_factory=list)  # (time, step)

    @property
    def hours(self) -> float:
        return max(0.0, self.end - self.start) / 3600.0

    @property
    def ended(self) -> bool:
        return self.end_reason != END_STILL_RUNNING


def instance_spans(events: list[dict], status: dict | None, now: float) -> list[InstanceSpan]:
    """Return one span per instance_started event, in start order.

    A span ends at that instance's next ending event. Without one, it ends at the
    reclaim time of its spot notice or the start of the next instance, whichever is
    earlier. The newest span ends at the last status update once the run has ended,
    and at ``now`` while the run goes on.
    """
    spans: list[InstanceSpan] = []
    open_spans: dict[str, InstanceSpan] = {}
    for event in events:
        instance_id = event.get("instance_id", "")
        when = float(event.get("time", 0))
        kind = event.get("type")
        if kind == "instance_started":
            span = InstanceSpan(instance_id, event.get("instance_type"),
                                event.get("availability_zone"), when, when, END_STILL_RUNNING)
            spans.append(span)
            open_spans[instance_id] = span
            continue
        span = open_spans.get(instance_id)
        if span is None:
            continue
        if kind == "interruption_notice":
            span.notice_at = when
            if event.get("notice_time") is not None:
                span.reclaim_at = float(event["notice_time"])
        elif kind == "checkpoint_committed" and event.get("step") is not None:
            span.checkpoints.append((when, int(event["step"])))
        if kind in ENDING_EVENTS:
            span.end, span.end_reason = when, kind
            del open_spans[instance_id]

    for index, span in enumerate(spans):
        if span.end_reason != END_STILL_RUNNING:
            continue
        later_starts = [other.start for other in spans[index + 1:]]
        if later_starts:
            span.end, span.end_reason = later_starts[0], END_NEXT_INSTANCE
            if span.reclaim_at is not None and span.reclaim_at < span.end:
                span.end, span.end_reason = span.reclaim_at, END_RECLAIM_TIME
        elif status and status.get("state") in ENDED_STATES and status.get("updated_at"):
            span.end, span.end_reason = float(status["updated_at"]), END_STATUS_UPDATE
        else:
            span.end = now
        span.end = max(span.end, span.start)
    return spans


def interruptions(events: list[dict]) -> list[dict]:
    """Pair each spot notice with the checkpoint saved for it and the next resume."""
    records = []
    for index, event in enumerate(events):
        if event.get("type") != "interruption_notice":
            continue
        record = {"instance_id": event.get("instance_id"), "time": event.get("time"),
                  "action": event.get("action"), "step_at_notice": event.get("step_at_notice"),
                  "reclaim_at": event.get("notice_time"), "checkpoint_step": None,
                  "steps_lost": None, "resumed_from": None, "resumed_on": None,
                  "resumed_at": None}
        for later in events[index + 1:]:
            same_instance = later.get("instance_id") == event.get("instance_id")
            if (later.get("type") == "interruption_checkpoint" and same_instance
                    and record["checkpoint_step"] is None):
                record["checkpoint_step"] = later.get("checkpoint_step")
                record["steps_lost"] = later.get("steps_lost")
            # In a multi-node run the leader may resume before the interrupted member
            # records its checkpoint, so look for both events.
            if (later.get("type") == "resumed" and not same_instance
                    and record["resumed_from"] is None):
                record["resumed_from"] = later.get("step")
                record["resumed_on"] = later.get("instance_id")
                record["resumed_at"] = later.get("time")
            if record["resumed_from"] is not None and record["checkpoint_step"] is not None:
                break
        records.append(record)
    return records
