"""stacks.config: parameter parsing and validation, in-process and through the CDK CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stacks.config import ParameterError, RunParameters, from_context, parameter_names

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CDK_CLI = PROJECT_ROOT / "node_modules" / ".bin" / "cdk"
CDK_TIMEOUT_SECONDS = 300


def test_defaults_are_valid() -> None:
    params = RunParameters()

    assert params.run_name == "digits-demo"
    assert params.max_runtime_seconds == params.max_runtime_hours * 3600


def test_empty_context_gives_defaults() -> None:
    assert from_context({}) == RunParameters()


def test_cdk_json_context_is_valid() -> None:
    context = json.loads((PROJECT_ROOT / "cdk.json").read_text())["context"]

    params = from_context(context)

    assert set(context) <= set(parameter_names())
    assert params.run_name == context["run_name"]
    assert list(params.instance_types) == context["instance_types"]


def test_cdk_own_context_keys_ignored() -> None:
    context = {
        "@aws-cdk/core:newStyleStackSynthesis": True,
        "aws:cdk:enable-path-metadata": True,
        "cdk-migrate": True,
        "acknowledged-issue-numbers": [12345],
    }

    assert from_context(context) == RunParameters()


# Each case: parameter name, invalid value, text the message must contain.
INVALID_VALUES = [
    ("run_name", "Digits-Demo", 'run_name="Digits-Demo"'),
    ("run_name", "digits_demo", 'run_name="digits_demo"'),
    ("run_name", "a" * 41, f'run_name="{"a" * 41}"'),
    ("run_name", "-digits", 'run_name="-digits"'),
    ("run_name", "", 'run_name=""'),
    ("instance_types", [], "instance_types=[]"),
    ("instance_types", ["g5.xlarge", "g5.xlarge"],
     'instance_types=["g5.xlarge", "g5.xlarge"]'),
    ("instance_types", ["g5xlarge"], 'instance_types="g5xlarge"'),
    ("instance_types", ["G5.XLARGE"], 'instance_types="G5.XLARGE"'),
    ("ami", "ubuntu-22.04", 'ami="ubuntu-22.04"'),
    ("python", "python3", 'python="python3"'),
    ("python", "/opt/my python/bin/python3", 'python="/opt/my python/bin/python3"'),
    ("root_volume_gb", 4, "root_volume_gb=4"),
    ("train_command", [], "train_command=[]"),
    ("data_source", "s3://", 'data_source="s3://"'),
    ("data_source", "s3:/bucket/prefix", 'data_source="s3:/bucket/prefix"'),
    ("data_source", "", 'data_source=""'),
    ("checkpoint_every_steps", -5, "checkpoint_every_steps=-5"),
    ("keep_checkpoints", 1, "keep_checkpoints=1"),
    ("poll_interval_seconds", 0, "poll_interval_seconds=0.0"),
    ("poll_interval_seconds", 10, "poll_interval_seconds=10.0"),
    ("max_crash_restarts", -1, "max_crash_restarts=-1"),
    ("max_restarts_without_progress", 0, "max_restarts_without_progress=0"),
    ("heartbeat_timeout_seconds", 1, "heartbeat_timeout_seconds=1.0"),
    ("lease_ttl_seconds", 5, "lease_ttl_seconds=5.0"),
    ("lease_ttl_seconds", 4000, "lease_ttl_seconds=4000.0"),
    ("max_runtime_hours", 0, "max_runtime_hours=0.0"),
    ("log_retention_days", 2, "log_retention_days=2"),
    ("notification_email", "ml-team", 'notification_email="ml-team"'),
    ("notification_email", "ml team@example.com", 'notification_email="ml team@example.com"'),
    ("nodes", 0, "nodes=0"),
    ("nodes", 65, "nodes=65"),
    ("min_nodes", 3, "min_nodes=3"),
    ("min_nodes", -1, "min_nodes=-1"),
    ("rendezvous_timeout_seconds", 5, "rendezvous_timeout_seconds=5.0"),
    ("collective_timeout_seconds", 4000, "collective_timeout_seconds=4000.0"),
    ("gpus_per_node", -1, "gpus_per_node=-1"),
    ("vpc_id", "vpc-123", 'vpc_id="vpc-123"'),
    ("vpc_id", "VPC-0123456789ABCDEF0", 'vpc_id="VPC-0123456789ABCDEF0"'),
    ("vpc_id", "vpc-0123456789abcdef0", "subnet_ids=[]"),
    ("subnet_ids", ["subnet-0123456789abcdef0"], 'vpc_id=""'),
]


@pytest.mark.parametrize(("name", "value", "shown"), INVALID_VALUES,
                         ids=[f"{name}={json.dumps(value)[:20]}"
                              for name, value, _ in INVALID_VALUES])
def test_invalid_value_names_parameter(name: str, value: object, shown: str) -> None:
    with pytest.raises(ParameterError) as raised:
        from_context({name: value})

    message = str(raised.value)
    assert shown in message
    assert "expected" in message
    assert "\n" not in message


@pytest.mark.parametrize(("name", "text", "shown"), [
    ("checkpoint_every_steps", "-5", "checkpoint_every_steps=-5"),
    ("keep_checkpoints", "1", "keep_checkpoints=1"),
    ("poll_interval_seconds", "10", "poll_interval_seconds=10.0"),
    ("log_retention_days", "2", "log_retention_days=2"),
    ("run_name", "Digits_Demo", 'run_name="Digits_Demo"'),
])
def test_invalid_string_value_rejected(name: str, text: str, shown: str) -> None:
    with pytest.raises(ParameterError) as raised:
        from_context({name: text})

    assert shown in str(raised.value)


@pytest.mark.parametrize(("name", "value", "shown"), [
    ("fis_drill", "yes", "fis_drill"),
    ("nodes", 1.5, "nodes=1.5"),
    ("subnet_ids", "[1]", "subnet_ids=[1]"),
    ("keep_bucket", "yes", "keep_bucket"),
    ("keep_bucket", 1, "keep_bucket=1"),
    ("root_volume_gb", "12.5", "root_volume_gb=12.5"),
    ("root_volume_gb", True, "root_volume_gb=true"),
    ("keep_checkpoints", "many", "keep_checkpoints='many'"),
    ("max_runtime_hours", "long", "max_runtime_hours='long'"),
    ("instance_types", [5], "instance_types=[5]"),
    ("python", 3, "python=3"),
])
def test_wrong_type_rejected(name: str, value: object, shown: str) -> None:
    with pytest.raises(ParameterError) as raised:
        from_context({name: value})

    assert shown in str(raised.value)


# Each case: a whole context, the text the message must contain.
NETWORK_CASES = [
    ({"vpc_id": "vpc-0123456789abcdef0", "subnet_ids": ["subnet-12345"]},
     'subnet_ids="subnet-12345"'),
    ({"vpc_id": "vpc-0123456789abcdef0", "subnet_ids": ["sg-0123456789abcdef0"]},
     'subnet_ids="sg-0123456789abcdef0"'),
    ({"vpc_id": "vpc-0123456789abcdef0",
      "subnet_ids": ["subnet-12345678", "subnet-12345678"]},
     'subnet_ids=["subnet-12345678", "subnet-12345678"]'),
]


@pytest.mark.parametrize(("context", "shown"), NETWORK_CASES,
                         ids=["short-subnet", "not-subnet", "duplicate-subnet"])
def test_invalid_network_rejected(context: dict, shown: str) -> None:
    with pytest.raises(ParameterError) as raised:
        from_context(context)

    message = str(raised.value)
    assert shown in message
    assert "\n" not in message


def test_vpc_without_subnets_names_both() -> None:
    with pytest.raises(ParameterError) as raised:
        from_context({"vpc_id": "vpc-0123456789abcdef0"})

    message = str(raised.value)
    assert "vpc-0123456789abcdef0" in message
    assert "give both or neither" in message


def test_existing_network_accepted() -> None:
    params = from_context({"vpc_id": "vpc-12345678",
                           "subnet_ids": "subnet-12345678,subnet-0123456789abcdef0"})

    assert params.vpc_id == "vpc-12345678"
    assert params.subnet_ids == ("subnet-12345678", "subnet-0123456789abcdef0")


def test_new_options_default_off() -> None:
    params = RunParameters()

    assert params.nodes == 1
    assert params.gpus_per_node == 1
    assert params.notification_email == ""
    assert (params.vpc_id, params.subnet_ids) == ("", ())
    assert params.on_demand_fallback is False
    assert params.capacity_rebalance is False
    assert params.fis_drill is False


def test_unknown_parameter_rejected() -> None:
    with pytest.raises(ParameterError) as raised:
        from_context({"no_such_param": 1})

    message = str(raised.value)
    assert "'no_such_param'" in message
    # The message lists the valid names so that the user can fix a typo.
    for name in parameter_names():
        assert name in message


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("keep_bucket", "true", True),
    ("keep_bucket", "false", False),
    ("instance_types", '["g5.xlarge"]', ("g5.xlarge",)),
    ("instance_types", "g5.xlarge,g6.xlarge", ("g5.xlarge", "g6.xlarge")),
    ("instance_types", "g5.xlarge, g6.xlarge", ("g5.xlarge", "g6.xlarge")),
    ("instance_types", "g5.xlarge", ("g5.xlarge",)),
    ("train_command", '["{python}", "-m", "ml.digits", "--epochs", "3"]',
     ("{python}", "-m", "ml.digits", "--epochs", "3")),
    ("root_volume_gb", "12", 12),
    ("checkpoint_every_steps", "0", 0),
    ("max_runtime_hours", "12", 12.0),
    ("poll_interval_seconds", "0.5", 0.5),
    ("run_name", "123", "123"),
    ("data_source", "s3://my-bucket/datasets/digits", "s3://my-bucket/datasets/digits"),
    ("ami", "ami-0123456789abcdef0", "ami-0123456789abcdef0"),
    ("nodes", "1", 1),
    ("gpus_per_node", "0", 0),
    ("notification_email", "ml-team@example.com", "ml-team@example.com"),
    ("on_demand_fallback", "true", True),
    ("capacity_rebalance", "true", True),
    ("fis_drill", "false", False),
])
def test_command_line_string_parsed(name: str, text: str, expected: object) -> None:
    params = from_context({name: text})

    value = getattr(params, name)
    assert value == expected
    assert type(value) is type(expected)


# CDK CLI ---------------------------------------------------------------------------


def run_cdk_synth(output_dir: Path, *context: str) -> subprocess.CompletedProcess:
    """Run `cdk synth` of this project with no AWS credentials and nothing sent out."""
    if not CDK_CLI.exists():
        pytest.skip(f"the CDK CLI is not installed at {CDK_CLI}; run `npm ci`")
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    env.update({
        # No profile, no credentials file and no instance metadata lookups.
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
        "CDK_DISABLE_VERSION_CHECK": "1",
        "CDK_DISABLE_CLI_TELEMETRY": "true",
        "JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION": "1",
    })
    command = [str(CDK_CLI), "synth", "--app", f"{sys.executable} app.py",
               "-o", str(output_dir), "--no-notices", "--no-color", "--quiet"]
    for item in context:
        command += ["-c", item]
    return subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=CDK_TIMEOUT_SECONDS)


@pytest.mark.parametrize(("context", "expected_line"), [
    ("checkpoint_every_steps=-5",
     "error: invalid stack parameter checkpoint_every_steps=-5: expected "),
    ("no_such_param=1", "error: unknown stack parameter 'no_such_param': valid names are "),
    ("vpc_id=vpc-0123456789abcdef0",
     "error: invalid stack parameter subnet_ids=[]: expected the public subnets of vpc_id "),
], ids=["negative-checkpoint-steps", "unknown-name", "vpc-without-subnets"])
def test_cdk_synth_rejects_bad_parameter(tmp_path: Path, context: str,
                                         expected_line: str) -> None:
    result = run_cdk_synth(tmp_path / "cdk.out", context)
    output = result.stdout + result.stderr

    assert result.returncode != 0
    error_lines = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, output
    assert error_lines[0].startswith(expected_line)
    assert "Traceback" not in output
    assert not list((tmp_path / "cdk.out").glob("*.template.json"))


def test_cdk_synth_defaults_offline(tmp_path: Path) -> None:
    result = run_cdk_synth(tmp_path / "cdk.out")
    output = result.stdout + result.stderr

    assert result.returncode == 0, output
    assert "Traceback" not in output
    template_path = tmp_path / "cdk.out" / "Spotrun-digits-demo.template.json"
    template = json.loads(template_path.read_text())
    groups = [resource for resource in template["Resources"].values()
              if resource["Type"] == "AWS::AutoScaling::AutoScalingGroup"]
    assert len(groups) == 1
    assert groups[0]["Properties"]["AutoScalingGroupName"] == "spotrun-digits-demo"


def test_torchrun_rejects_interpreter_options() -> None:
    with pytest.raises(ParameterError) as raised:
        from_context({"nodes": 2, "train_command": ["{python}", "-u", "-m", "ml.digits"]})

    message = str(raised.value)
    assert 'train_command=["{python}", "-u", "-m", "ml.digits"]' in message
    assert "torchrun" in message


def test_single_process_accepts_interpreter_options() -> None:
    params = from_context({"train_command": ["{python}", "-u", "-m", "ml.digits"]})

    assert params.train_command == ("{python}", "-u", "-m", "ml.digits")


def test_collective_timeout_below_heartbeat_for_torchrun() -> None:
    with pytest.raises(ParameterError) as raised:
        from_context({"nodes": 2, "heartbeat_timeout_seconds": 60,
                      "collective_timeout_seconds": 60})

    assert "collective_timeout_seconds=60.0" in str(raised.value)
    assert "heartbeat_timeout_seconds (60)" in str(raised.value)


def test_min_nodes_zero_means_all_nodes() -> None:
    assert from_context({"nodes": 3}).effective_min_nodes == 3
    assert from_context({"nodes": 3, "min_nodes": 2}).effective_min_nodes == 2
