"""Cost estimates of a run: instance hours times spot and on-demand prices.

Spot prices come from EC2 DescribeSpotPriceHistory for the instance type and
Availability Zone, averaged over each instance's hours. On-demand prices come from a
JSON table (prices.json in this package, or a file given with --prices). Each price
carries the source it came from. The result is an estimate: EBS volumes, data
transfer, S3 and the time before the supervisor started are not counted.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from spotrun_cli.aws import CliError
from spotrun_cli.timeline import InstanceSpan

log = logging.getLogger("spotrun.cli")

DEFAULT_PRICE_TABLE = Path(__file__).with_name("prices.json")
SPOT_PRODUCT = "Linux/UNIX"
SPOT_HISTORY_SOURCE = "EC2 spot price history"


@dataclass(frozen=True)
class Price:
    """A price in USD per instance-hour, or None when unknown, and where it came from."""

    per_hour: float | None
    source: str


class PriceTable:
    """On-demand prices by region and instance type, read from a JSON file."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or DEFAULT_PRICE_TABLE
        try:
            document = json.loads(self.path.read_text(encoding="utf-8"))
            self.regions: dict[str, dict[str, float]] = document["regions"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CliError(f"invalid price table {self.path}: {error}; expected a JSON "
                           f"object with \"regions\": {{REGION: {{TYPE: USD_PER_HOUR}}}}") from None
        self.label = "price table" if path is None else f"price table {self.path.name}"

    def on_demand(self, region: str | None, instance_type: str | None) -> Price:
        prices = self.regions.get(region or "", {})
        if instance_type in prices:
            return Price(float(prices[instance_type]), f"{self.label}, {region}")
        for other_region, other_prices in sorted(self.regions.items()):
            if instance_type in other_prices:
                return Price(float(other_prices[instance_type]),
                             f"{self.label}, {other_region} (no {region} entry)")
        return Price(None, f"{instance_type} not in {self.label}")


def average_spot_price(ec2, instance_type: str, availability_zone: str, start: float,
                       end: float) -> Price | None:
    """Return the time-weighted spot price over [start, end], or None without history.

    EC2 returns the price changes in the range plus the last change before ``start``,
    which is the price in effect at ``start``.
    """
    records = []
    paginator = ec2.get_paginator("describe_spot_price_history")
    pages = paginator.paginate(
        InstanceTypes=[instance_type], AvailabilityZone=availability_zone,
        ProductDescriptions=[SPOT_PRODUCT],
        StartTime=dt.datetime.fromtimestamp(start, dt.timezone.utc),
        EndTime=dt.datetime.fromtimestamp(max(end, start + 1), dt.timezone.utc))
    for page in pages:
        for item in page.get("SpotPriceHistory", []):
            records.append((item["Timestamp"].timestamp(), float(item["SpotPrice"])))
    if not records:
        return None
    records.sort()
    if end <= start:
        return Price(records[-1][1], SPOT_HISTORY_SOURCE)
    total = 0.0
    for index, (changed_at, price) in enumerate(records):
        segment_start = max(start, changed_at) if index else start
        segment_end = records[index + 1][0] if index + 1 < len(records) else end
        segment_end = min(max(segment_end, start), end)
        total += price * max(0.0, segment_end - segment_start)
    return Price(total / (end - start), SPOT_HISTORY_SOURCE)


@dataclass
class CostRow:
    span: InstanceSpan
    spot: Price
    on_demand: Price

    @property
    def spot_cost(self) -> float | None:
        return None if self.spot.per_hour is None else self.spot.per_hour * self.span.hours

    @property
    def on_demand_cost(self) -> float | None:
        if self.on_demand.per_hour is None:
            return None
        return self.on_demand.per_hour * self.span.hours

    def to_dict(self) -> dict:
        return {
            "instance_id": self.span.instance_id,
            "instance_type": self.span.instance_type,
            "availability_zone": self.span.availability_zone,
            "start": self.span.start,
            "end": self.span.end,
            "end_reason": self.span.end_reason,
            "hours": self.span.hours,
            "spot_price_per_hour": self.spot.per_hour,
            "spot_price_source": self.spot.source,
            "spot_cost": self.spot_cost,
            "on_demand_price_per_hour": self.on_demand.per_hour,
            "on_demand_price_source": self.on_demand.source,
            "on_demand_cost": self.on_demand_cost,
        }


@dataclass
class CostSummary:
    rows: list[CostRow]

    @property
    def hours(self) -> float:
        return sum(row.span.hours for row in self.rows)

    @property
    def spot_total(self) -> float | None:
        return _sum_or_none(row.spot_cost for row in self.rows)

    @property
    def on_demand_total(self) -> float | None:
        return _sum_or_none(row.on_demand_cost for row in self.rows)

    @property
    def savings_fraction(self) -> float | None:
        """Return 1 - spot / on-demand; None unless every spot price came from EC2."""
        if any(row.spot.source != SPOT_HISTORY_SOURCE for row in self.rows):
            return None
        spot, on_demand = self.spot_total, self.on_demand_total
        if spot is None or not on_demand:
            return None
        return 1.0 - spot / on_demand

    def to_dict(self) -> dict:
        return {"currency": "USD", "hours": self.hours, "spot_total": self.spot_total,
                "on_demand_total": self.on_demand_total,
                "savings_fraction": self.savings_fraction,
                "instances": [row.to_dict() for row in self.rows]}


def _sum_or_none(values) -> float | None:
    """Return the sum, or None when any value is unknown."""
    total = 0.0
    for value in values:
        if value is None:
            return None
        total += value
    return total


def estimate_costs(spans: list[InstanceSpan], region: str | None, table: PriceTable,
                   ec2=None, no_spot_reason: str = "spot price history not read") -> CostSummary:
    """Price each span; with ``ec2`` None the spot hours are priced at on-demand rates.

    ``no_spot_reason`` is the source text for that case.
    """
    rows = []
    for span in spans:
        on_demand = table.on_demand(region, span.instance_type)
        spot = _spot_price(ec2, span) if ec2 is not None else None
        if spot is None:
            reason = no_spot_reason if ec2 is None else "no spot price history"
            spot = Price(on_demand.per_hour, f"{reason}; on-demand {on_demand.source}")
        rows.append(CostRow(span, spot, on_demand))
    return CostSummary(rows)


def _spot_price(ec2, span: InstanceSpan) -> Price | None:
    if not span.instance_type or not span.availability_zone:
        return None
    try:
        return average_spot_price(ec2, span.instance_type, span.availability_zone,
                                  span.start, span.end)
    except (ClientError, BotoCoreError) as error:
        log.warning("could not read the spot price history of %s in %s: %s",
                    span.instance_type, span.availability_zone, error)
        return None
