"""Read a run's CloudWatch Logs group, once or by polling."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable

from botocore.exceptions import ClientError

from spotrun_cli.aws import CliError, error_code


def check_group(logs, group: str) -> bool:
    """Return whether the group has at least one log stream; raise CliError if it is missing."""
    try:
        response = logs.describe_log_streams(logGroupName=group, limit=1)
    except ClientError as error:
        if error_code(error) == "ResourceNotFoundException":
            raise CliError(f"log group {group} not found; the stack creates it on `cdk "
                           f"deploy` and `cdk destroy` deletes it") from None
        raise
    return bool(response.get("logStreams"))


def fetch_events(logs, group: str, start_ms: int | None) -> list[dict]:
    """Return every event of the group from ``start_ms`` (inclusive), oldest first."""
    arguments = {"logGroupName": group}
    if start_ms is not None:
        arguments["startTime"] = start_ms
    events = []
    for page in logs.get_paginator("filter_log_events").paginate(**arguments):
        events.extend(page.get("events", []))
    events.sort(key=lambda event: (event.get("timestamp", 0), event.get("eventId", "")))
    return events


def format_event(event: dict) -> str:
    moment = dt.datetime.fromtimestamp(event.get("timestamp", 0) / 1000, dt.timezone.utc)
    stamp = moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    message = event.get("message", "").rstrip("\n")
    return f"{stamp} {event.get('logStreamName', '?')} {message}"


def print_logs(logs, group: str, *, start_ms: int | None, follow: bool, interval_s: float,
               write: Callable[[str], None], note: Callable[[str], None],
               sleep: Callable[[float], None] = time.sleep) -> None:
    """Write the group's events; with ``follow`` keep polling until interrupted.

    ``note`` receives the one-line message for a group without streams.
    """
    if not check_group(logs, group):
        note(f"log group {group} has no log streams yet: the instances do not send their "
             f"logs to CloudWatch Logs yet; `spotrun status` shows the run's progress")
        if not follow:
            return
    seen_at_last_ms: set[str] = set()
    last_ms = start_ms
    while True:
        for event in fetch_events(logs, group, last_ms):
            event_id = event.get("eventId", "")
            timestamp = event.get("timestamp", 0)
            if last_ms is not None and timestamp == last_ms and event_id in seen_at_last_ms:
                continue
            if last_ms is None or timestamp > last_ms:
                last_ms, seen_at_last_ms = timestamp, set()
            seen_at_last_ms.add(event_id)
            write(format_event(event))
        if not follow:
            return
        sleep(interval_s)
