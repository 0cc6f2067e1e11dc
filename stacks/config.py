"""Stack parameters: read once from CDK context, validated into a typed object.

Every parameter lives in ``cdk.json`` under ``context`` and can be overridden with
``cdk deploy -c name=value``. Values given on the command line arrive as strings, so each
field is parsed from either its JSON type or its text form.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

# CDK's own context keys (feature flags, "acknowledged-issue-numbers", ...) live beside
# ours in cdk.json; only names without a namespace separator are stack parameters.
_CDK_OWN_KEY = re.compile(r"^(@|aws:|cdk[-:]|acknowledged-issue-numbers$)")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RUN_NAME_PATTERN = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?$")
INSTANCE_TYPE_PATTERN = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9]+$")
AMI_ID_PATTERN = re.compile(r"^ami-[0-9a-f]{8,17}$")
# Values CloudWatch Logs accepts for a log group's retention.
LOG_RETENTION_DAYS = (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731,
                      1096, 1827, 2192, 2557, 2922, 3288, 3653)
S3_URI_PATTERN = re.compile(r"^s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(/.*)?$")
# EC2 resource ids: the prefix, then 8 (older) or 17 hexadecimal digits.
VPC_ID_PATTERN = re.compile(r"^vpc-(?:[0-9a-f]{8}|[0-9a-f]{17})$")
SUBNET_ID_PATTERN = re.compile(r"^subnet-(?:[0-9a-f]{8}|[0-9a-f]{17})$")
# A plausibility check only: SNS sends a confirmation message to the address.
EMAIL_PATTERN = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
# A guard against a typo such as 100 for 10; torchrun itself has no such limit.
MAX_NODES = 64


class ParameterError(ValueError):
    """An invalid stack parameter; the message names the parameter, the value and the fix."""


@dataclass(frozen=True, kw_only=True)
class RunParameters:
    """Parameters of one training run, as a user sets them in cdk.json."""

    run_name: str = "digits-demo"
    """Name of the run: stack name suffix, S3 prefix ``runs/<run_name>/``, group name.
    Lowercase letters, digits and hyphens, 1-40 characters. A new name starts a new run;
    the same name resumes (or, once finished, ends at once)."""

    instance_types: tuple[str, ...] = ("g5.xlarge", "g4dn.xlarge", "g6.xlarge")
    """EC2 instance types the spot group may launch, most preferred first."""

    ami: str = "/aws/service/deeplearning/ami/x86_64/oss-nvidia-driver-gpu-pytorch-2.7-amazon-linux-2023/latest/ami-id"
    """An AMI id (``ami-...``) or the name of a public SSM parameter that contains one
    (resolved by EC2 at launch). The default is the AWS Deep Learning AMI with PyTorch."""

    python: str = "/opt/pytorch/bin/python3"
    """Python interpreter on the AMI that has PyTorch and boto3."""

    root_volume_gb: int = 100
    """Size of the encrypted gp3 root volume, in GiB."""

    train_command: tuple[str, ...] = ("{python}", "-m", "ml.digits")
    """Training command, run from the code bundle folder. ``{python}`` is replaced by
    the ``python`` parameter."""

    data_source: str = "data/digits"
    """Training data: a local folder shipped with the deployment, or an ``s3://`` URI."""

    checkpoint_every_steps: int = 50
    """Optimizer steps between periodic checkpoints; 0 means only on interruption."""

    keep_checkpoints: int = 2
    """Committed checkpoints kept in S3 (at least 2: the newest may still be uploading)."""

    poll_interval_seconds: float = 2.0
    """How often the instance polls IMDS for spot notices, in seconds (0.1-5)."""

    max_crash_restarts: int = 3
    """Trainer crashes tolerated over the whole run before the run is marked failed."""

    max_restarts_without_progress: int = 3
    """Trainer restarts in a row without a newer committed checkpoint before the run is
    marked failed (a crash loop that makes no progress)."""

    heartbeat_timeout_seconds: float = 900.0
    """A trainer that reports no step for this long is treated as hung: it is killed and
    counted as a crash. Allow for the slowest step and checkpoint, in seconds."""

    lease_ttl_seconds: float = 60.0
    """A run lease not renewed for this long belongs to a dead instance and may be taken
    over by the next one, in seconds (10-3600)."""

    max_runtime_hours: float = 24.0
    """Wall-clock limit of the run across all instances, in hours; then it stops."""

    keep_bucket: bool = True
    """Keep the run bucket (checkpoints, model, logs) when the stack is destroyed."""

    log_retention_days: int = 30
    """Retention of the run's CloudWatch log group, in days."""

    notification_email: str = ""
    """Email address subscribed to the run's SNS topic; empty for no subscription.
    AWS sends a confirmation message that the recipient must accept."""

    nodes: int = 1
    """Instances that train together (the group's maximum and desired capacity). With
    more than 1, each instance runs torchrun and they form one data-parallel job through
    a c10d rendezvous whose address the run lease holder publishes in S3."""

    min_nodes: int = 0
    """Minimum number of instances a multi-node round starts with, after waiting
    rendezvous_timeout_seconds for all nodes. 0 means nodes: every round waits for all
    of them, which keeps results identical to an uninterrupted run."""

    gpus_per_node: int = 1
    """Training processes per instance, one per GPU; 0 starts one per visible GPU (one on
    an instance without GPUs). Any value other than 1 launches training with torchrun."""

    rendezvous_timeout_seconds: float = 600.0
    """How long a multi-node round waits for its instances (a replacement after an
    interruption, for example) before it starts with min_nodes or the run fails, in
    seconds (10-3600). torchrun's join_timeout is the same."""

    collective_timeout_seconds: float = 300.0
    """How long one collective (an all-reduce, for example) may wait for its peers
    before the training process gives up on them and a new round starts, in seconds.
    Allow for the slowest step and checkpoint (10-3600)."""

    vpc_id: str = ""
    """Existing VPC to launch into, with subnet_ids; empty to create a VPC."""

    subnet_ids: tuple[str, ...] = ()
    """Public subnets of vpc_id for the group; they must give instances a route to S3."""

    on_demand_fallback: bool = False
    """After a failed launch, switch the group to On-Demand capacity for the rest of
    the run (an EventBridge rule starts an SSM Automation that updates the group)."""

    capacity_rebalance: bool = False
    """Let the group launch a replacement as soon as EC2 recommends a rebalance. The
    run lease keeps the replacement from training until the old instance is gone."""

    fis_drill: bool = False
    """Add an AWS FIS experiment template that sends spot interruptions to the group's
    running instances (started by hand, never automatically)."""

    def __post_init__(self) -> None:
        _check(RUN_NAME_PATTERN.match(self.run_name), "run_name", self.run_name,
               "lowercase letters, digits and hyphens, 1-40 characters, "
               "starting and ending with a letter or digit")
        _check(len(self.instance_types) > 0, "instance_types", list(self.instance_types),
               "a non-empty list such as [\"g5.xlarge\", \"g4dn.xlarge\"]")
        for instance_type in self.instance_types:
            _check(INSTANCE_TYPE_PATTERN.match(instance_type), "instance_types",
                   instance_type, "EC2 instance type names such as g5.xlarge")
        _check(len(set(self.instance_types)) == len(self.instance_types),
               "instance_types", list(self.instance_types), "each type listed once")
        _check(AMI_ID_PATTERN.match(self.ami) or self.ami.startswith("/"), "ami",
               self.ami, "an AMI id (ami-0123456789abcdef0) or an SSM parameter name "
               "starting with /")
        _check(self.python.startswith("/") and " " not in self.python, "python",
               self.python, "an absolute path to the interpreter, without spaces")
        _check(8 <= self.root_volume_gb <= 16384, "root_volume_gb", self.root_volume_gb,
               "an integer from 8 to 16384 (GiB)")
        _check(len(self.train_command) > 0 and all(self.train_command), "train_command",
               list(self.train_command), "a non-empty list of non-empty strings")
        _check(self.data_source and (S3_URI_PATTERN.match(self.data_source)
                                     or not self.data_source.startswith("s3:")),
               "data_source", self.data_source,
               "a local folder path or an S3 URI such as s3://my-bucket/datasets/digits")
        if not self.data_source.startswith("s3://"):
            folder = Path(self.data_source)
            if not folder.is_absolute():
                folder = PROJECT_ROOT / folder
            _check(folder.is_dir(), "data_source", self.data_source,
                   "an existing folder (relative paths start at the project root) or an "
                   "S3 URI")
        _check(self.checkpoint_every_steps >= 0, "checkpoint_every_steps",
               self.checkpoint_every_steps, "0 (only on interruption) or a positive step count")
        _check(self.keep_checkpoints >= 2, "keep_checkpoints", self.keep_checkpoints,
               "2 or more, because the newest checkpoint may still be uploading")
        _check(0.1 <= self.poll_interval_seconds <= 5, "poll_interval_seconds",
               self.poll_interval_seconds,
               "0.1 to 5 seconds (a spot notice comes 120 s before the instance is reclaimed)")
        _check(self.max_crash_restarts >= 0, "max_crash_restarts",
               self.max_crash_restarts, "0 or more")
        _check(self.max_restarts_without_progress >= 1, "max_restarts_without_progress",
               self.max_restarts_without_progress, "1 or more")
        _check(self.heartbeat_timeout_seconds >= 5, "heartbeat_timeout_seconds",
               self.heartbeat_timeout_seconds, "5 seconds or more")
        _check(10 <= self.lease_ttl_seconds <= 3600, "lease_ttl_seconds",
               self.lease_ttl_seconds, "10 to 3600 seconds")
        _check(self.max_runtime_hours > 0, "max_runtime_hours", self.max_runtime_hours,
               "a number of hours greater than 0")
        _check(self.log_retention_days in LOG_RETENTION_DAYS, "log_retention_days",
               self.log_retention_days,
               f"one of the CloudWatch Logs retention periods {list(LOG_RETENTION_DAYS)}")
        _check(not self.notification_email or EMAIL_PATTERN.match(self.notification_email),
               "notification_email", self.notification_email,
               "an email address such as ml-team@example.com, or \"\" for none")
        _check(1 <= self.nodes <= MAX_NODES, "nodes", self.nodes,
               f"an integer from 1 to {MAX_NODES}")
        _check(0 <= self.min_nodes <= self.nodes, "min_nodes", self.min_nodes,
               f"0 (same as nodes) or an integer from 1 to nodes ({self.nodes})")
        _check(self.gpus_per_node >= 0, "gpus_per_node", self.gpus_per_node,
               "an integer of 0 or more (0 for one process per visible GPU)")
        _check(10 <= self.rendezvous_timeout_seconds <= 3600, "rendezvous_timeout_seconds",
               self.rendezvous_timeout_seconds, "10 to 3600 seconds")
        _check(10 <= self.collective_timeout_seconds <= 3600, "collective_timeout_seconds",
               self.collective_timeout_seconds, "10 to 3600 seconds")
        if self.nodes > 1 or self.gpus_per_node != 1:
            _check(self.collective_timeout_seconds < self.heartbeat_timeout_seconds,
                   "collective_timeout_seconds", self.collective_timeout_seconds,
                   f"less than heartbeat_timeout_seconds ({self.heartbeat_timeout_seconds:g}),"
                   " so that a process waiting for a dead peer ends as a lost peer, not as a "
                   "hung trainer")
            _check(self._runs_under_torchrun(), "train_command", list(self.train_command),
                   "[\"{python}\", \"-m\", \"module\", ...], [\"{python}\", \"script.py\", ...] or "
                   "another executable, because torchrun starts it (nodes > 1 or "
                   "gpus_per_node != 1); interpreter options such as -u are not supported")
        self._check_network()

    def _check_network(self) -> None:
        _check(not self.vpc_id or VPC_ID_PATTERN.match(self.vpc_id), "vpc_id", self.vpc_id,
               "a VPC id such as vpc-0123456789abcdef0, or \"\" to create a VPC")
        for subnet_id in self.subnet_ids:
            _check(SUBNET_ID_PATTERN.match(subnet_id), "subnet_ids", subnet_id,
                   "subnet ids such as subnet-0123456789abcdef0")
        _check(len(set(self.subnet_ids)) == len(self.subnet_ids), "subnet_ids",
               list(self.subnet_ids), "each subnet listed once")
        _check(self.subnet_ids or not self.vpc_id, "subnet_ids", list(self.subnet_ids),
               f"the public subnets of vpc_id {self.vpc_id} (give both or neither)")
        _check(self.vpc_id or not self.subnet_ids, "vpc_id", self.vpc_id,
               "the id of the VPC that holds subnet_ids (give both or neither)")

    def _runs_under_torchrun(self) -> bool:
        if self.train_command[0] != "{python}":
            return True
        rest = self.train_command[1:]
        return bool(rest) and (rest[0] == "-m" or not rest[0].startswith("-"))

    @property
    def effective_min_nodes(self) -> int:
        return self.min_nodes or self.nodes

    @property
    def max_runtime_seconds(self) -> float:
        return self.max_runtime_hours * 3600.0


def _check(condition: Any, name: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ParameterError(
            f"invalid stack parameter {name}={json.dumps(value)}: expected {allowed}"
        )


def parameter_names() -> list[str]:
    return [field.name for field in fields(RunParameters)]


def from_context(context: Mapping[str, Any]) -> RunParameters:
    """Build RunParameters from CDK context values, rejecting unknown names."""
    known = {field.name: field for field in fields(RunParameters)}
    values: dict[str, Any] = {}
    for name, raw in context.items():
        if _CDK_OWN_KEY.match(name):
            continue
        if name not in known:
            raise ParameterError(
                f"unknown stack parameter {name!r}: valid names are "
                f"{', '.join(sorted(known))}"
            )
        values[name] = _parse_value(name, raw, known[name].default)
    return RunParameters(**values)


def _parse_value(name: str, raw: Any, default: Any) -> Any:
    """Convert a context value to the type of the parameter's default."""
    expected = type(default)
    if isinstance(raw, str) and expected is not str:
        # Values given with -c name=value are strings; parse them as JSON.
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            if expected is tuple:
                raw = [item.strip() for item in raw.split(",") if item.strip()]
            else:
                raise ParameterError(
                    f"invalid stack parameter {name}={raw!r}: expected a "
                    f"{_type_word(expected)}"
                ) from None
    if expected is tuple:
        if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
            raise ParameterError(
                f"invalid stack parameter {name}={json.dumps(raw)}: expected a list of strings"
            )
        return tuple(raw)
    if expected is bool:
        if not isinstance(raw, bool):
            raise ParameterError(
                f"invalid stack parameter {name}={json.dumps(raw)}: expected true or false"
            )
        return raw
    if expected is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ParameterError(
                f"invalid stack parameter {name}={json.dumps(raw)}: expected an integer"
            )
        return raw
    if expected is float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise ParameterError(
                f"invalid stack parameter {name}={json.dumps(raw)}: expected a number"
            )
        return float(raw)
    if not isinstance(raw, str):
        raise ParameterError(
            f"invalid stack parameter {name}={json.dumps(raw)}: expected a string"
        )
    return raw


def _type_word(expected: type) -> str:
    return {int: "integer", float: "number", bool: "true or false"}.get(expected, "string")
