"""Run reporting to the outside world: CloudWatch Logs and SNS notifications.

Neither may stop or slow training. Log records are batched and sent from watchtower's
background thread; a failed notification is logged as a warning and dropped.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

from botocore.exceptions import BotoCoreError, ClientError

log = logging.getLogger("spotrun.reporting")

LOG_FORMAT = "%(asctime)s %(levelname)s run=%(run_id)s instance=%(instance_id)s " \
             "step=%(step)s %(name)s: %(message)s"
# Seconds between batches sent to CloudWatch Logs.
LOG_SEND_INTERVAL_S = 5
# SNS limits a subject to 100 characters.
SUBJECT_LIMIT = 100


class RunContextFilter(logging.Filter):
    """Add the run id, the instance id and the current training step to each record."""

    def __init__(self, run_id: str, instance_id: str, current_step: Callable[[], object]):
        super().__init__()
        self.run_id = run_id
        self.instance_id = instance_id
        self.current_step = current_step

    def filter(self, record: logging.LogRecord) -> bool:
        record.run_id = self.run_id
        record.instance_id = self.instance_id
        record.step = self.current_step()
        return True


def start_cloudwatch_logs(logs_client, log_group: str, context: RunContextFilter) -> list:
    """Send the supervisor's log records to ``<instance_id>/supervisor`` in the log group.

    Returns the handlers to flush at the end. watchtower is installed by the user-data
    when the AMI lacks it; without it the run goes on with local logs only.
    """
    try:
        import watchtower
    except ImportError:
        log.warning("watchtower is not installed; logs stay on the instance only")
        return []
    handler = watchtower.CloudWatchLogHandler(
        log_group_name=log_group, log_stream_name=f"{context.instance_id}/supervisor",
        boto3_client=logs_client, create_log_group=False,
        send_interval=LOG_SEND_INTERVAL_S)
    handler.addFilter(context)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(logging.INFO)
    logging.getLogger().addHandler(handler)
    for name in ("watchtower", "botocore", "urllib3"):
        # watchtower's own send failures must not loop back into CloudWatch.
        logging.getLogger(name).propagate = name != "watchtower"
    log.info("sending logs to CloudWatch Logs group %s", log_group)
    return [handler]


class TrainerLogForwarder:
    """Copy new lines of the trainer's log file to ``<instance_id>/trainer``."""

    def __init__(self, logs_client, log_group: str, context: RunContextFilter,
                 path: Path) -> None:
        self.path = path
        self._offset = 0
        self.handler = None
        try:
            import watchtower
        except ImportError:
            return
        self.handler = watchtower.CloudWatchLogHandler(
            log_group_name=log_group, log_stream_name=f"{context.instance_id}/trainer",
            boto3_client=logs_client, create_log_group=False,
            send_interval=LOG_SEND_INTERVAL_S)
        self.handler.addFilter(context)
        self.handler.setFormatter(logging.Formatter("%(message)s"))
        self.logger = logging.getLogger("spotrun.trainer_output")
        self.logger.propagate = False
        self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.INFO)

    def forward_new_lines(self) -> None:
        if self.handler is None:
            return
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
        except FileNotFoundError:
            return
        complete, _, _ = chunk.rpartition(b"\n")
        if not complete:
            return
        self._offset += len(complete) + 1
        for line in complete.decode("utf-8", errors="replace").splitlines():
            self.logger.info("%s", line)


class Notifier:
    """Publish run lifecycle messages to the run's SNS topic, in a background thread."""

    def __init__(self, sns_client, topic_arn: str, run_id: str) -> None:
        self.sns = sns_client
        self.topic_arn = topic_arn
        self.run_id = run_id
        self._threads: list[threading.Thread] = []

    def publish(self, subject: str, lines: list[str]) -> None:
        if not self.topic_arn:
            return
        full_subject = f"spotrun {self.run_id}: {subject}"[:SUBJECT_LIMIT]
        thread = threading.Thread(target=self._send, args=(full_subject, "\n".join(lines)),
                                  name="sns-notification", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _send(self, subject: str, message: str) -> None:
        try:
            self.sns.publish(TopicArn=self.topic_arn, Subject=subject, Message=message)
        except (ClientError, BotoCoreError) as error:
            log.warning("could not publish notification %r to %s: %s", subject,
                        self.topic_arn, error)

    def wait(self, timeout_s: float = 10.0) -> None:
        """Wait for notifications in flight, before the instance powers off."""
        for thread in self._threads:
            thread.join(timeout_s)


def flush_handlers(handlers: list) -> None:
    for handler in handlers:
        try:
            handler.flush()
            handler.close()
        except (ClientError, BotoCoreError, OSError) as error:
            log.warning("could not flush logs to CloudWatch Logs: %s", error)


# Events after which an instance no longer works for the run.
INSTANCE_END_EVENTS = frozenset({"interruption_checkpoint", "completed", "failed",
                                 "stopped", "bootstrap_crash"})


def instance_hours(events: list[dict], now: float) -> float:
    """Sum the hours from each instance's start event to its end event (or ``now``).

    This counts supervisor time only: boot and user-data time before the supervisor
    starts, and the seconds between the end event and power-off, are not included.
    """
    total_s = 0.0
    ordered = sorted(events, key=lambda event: event["time"])
    for index, event in enumerate(ordered):
        if event["type"] != "instance_started":
            continue
        end = next((later["time"] for later in ordered[index + 1:]
                    if later["instance_id"] == event["instance_id"]
                    and later["type"] in INSTANCE_END_EVENTS), now)
        total_s += max(0.0, end - event["time"])
    return total_s / 3600.0


def latest_spot_price(ec2_client, instance_type: str, availability_zone: str) -> float | None:
    """Return the newest Linux spot price of a type in a zone, in USD per hour."""
    history = ec2_client.describe_spot_price_history(
        InstanceTypes=[instance_type], AvailabilityZone=availability_zone,
        ProductDescriptions=["Linux/UNIX"], MaxResults=20)["SpotPriceHistory"]
    if not history:
        return None
    newest = max(history, key=lambda entry: entry["Timestamp"])
    return float(newest["SpotPrice"])
