"""Run configuration handed from the stack to the instance through user-data.

The stack builds a RunConfig at synth time (values may be CloudFormation tokens that
resolve at deploy time) and the supervisor reads the resolved JSON on the instance.
This module is the single definition of that document; standard library only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """The run configuration file is missing, malformed or inconsistent."""


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    run_id: str
    region: str
    bucket: str
    group_name: str
    # Training data: either a zip archive in S3 (a CDK asset) or an S3 prefix to copy.
    data_zip_uri: str = ""
    data_prefix_uri: str = ""
    train_command: list[str] = field(default_factory=list)
    checkpoint_every_steps: int = 50
    keep_checkpoints: int = 2
    poll_interval_seconds: float = 2.0
    max_crash_restarts: int = 3
    max_restarts_without_progress: int = 3
    heartbeat_timeout_seconds: float = 900.0
    max_runtime_seconds: float = 86400.0
    # A lease not renewed for this long belongs to a dead instance and may be taken over.
    lease_ttl_seconds: float = 60.0
    log_group: str = ""
    topic_arn: str = ""
    # Instances per round (max) and the fewest a round starts with after the leader
    # waited rendezvous_timeout_seconds for the rest.
    nodes: int = 1
    min_nodes: int = 1
    # Training processes per instance; 0 starts one per visible GPU.
    gpus_per_node: int = 1
    rendezvous_timeout_seconds: float = 600.0
    collective_timeout_seconds: float = 300.0

    @property
    def run_prefix(self) -> str:
        return f"runs/{self.run_id}/"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_file(cls, path: Path) -> "RunConfig":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as error:
            raise ConfigError(f"cannot read run configuration {path}: {error}") from error
        except json.JSONDecodeError as error:
            raise ConfigError(f"run configuration {path} is not valid JSON: {error}") from error
        try:
            config = cls(**data)
        except TypeError as error:
            raise ConfigError(f"run configuration {path} does not match: {error}") from error
        if bool(config.data_zip_uri) == bool(config.data_prefix_uri):
            raise ConfigError(
                f"run configuration {path} must set exactly one of data_zip_uri and "
                f"data_prefix_uri"
            )
        if not config.train_command:
            raise ConfigError(f"run configuration {path} has an empty train_command")
        if not 1 <= config.min_nodes <= config.nodes:
            raise ConfigError(f"run configuration {path} has min_nodes {config.min_nodes}; "
                              f"expected 1 to nodes ({config.nodes})")
        return config
