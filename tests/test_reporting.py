"""Cost estimate pieces of the supervisor's completion message."""

from __future__ import annotations

import pytest

from bootstrap.reporting import instance_hours, latest_spot_price
from tests.conftest import make_client


def event(kind: str, instance_id: str, at: float) -> dict:
    return {"type": kind, "instance_id": instance_id, "time": at}


def test_instance_hours_sums_each_instance_span():
    events = [
        event("instance_started", "i-1", 0.0),
        event("checkpoint_committed", "i-1", 900.0),
        event("interruption_checkpoint", "i-1", 1800.0),
        event("instance_started", "i-2", 2000.0),
        event("completed", "i-2", 5600.0),
    ]
    assert instance_hours(events, now=9000.0) == pytest.approx(0.5 + 1.0)


def test_instance_hours_counts_running_instance_until_now():
    events = [event("instance_started", "i-1", 100.0)]
    assert instance_hours(events, now=100.0 + 7200.0) == pytest.approx(2.0)


def test_instance_hours_ignores_other_instances_end_events():
    events = [
        event("instance_started", "i-1", 0.0),
        event("completed", "i-2", 60.0),
        event("failed", "i-1", 3600.0),
    ]
    assert instance_hours(events, now=10_000.0) == pytest.approx(1.0)


def test_latest_spot_price_reads_price_history(moto_endpoint):
    ec2 = make_client("ec2", moto_endpoint)
    price = latest_spot_price(ec2, "g5.xlarge", "us-east-1a")
    assert price is not None
    assert price > 0
