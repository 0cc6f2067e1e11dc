"""TrainingStack synthesized in-process and checked with aws_cdk.assertions.Template.

Each test reads one property of the template. The stack is synthesized three times per
module. The first uses the default parameters. The second changes every parameter of the
instance side (AMI id, S3 data source, instance types, bucket removal, ...). The third
turns on every option of the account side (existing VPC, nodes, fallback, FIS drill, ...).
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION", "1")

import aws_cdk as cdk  # noqa: E402
from aws_cdk.assertions import Match, Template  # noqa: E402

from bootstrap.config import RunConfig  # noqa: E402
from stacks.config import RunParameters  # noqa: E402
from stacks.training_stack import TrainingStack  # noqa: E402
from stacks.user_data import CONFIG_DELIMITER  # noqa: E402

DEFAULT_PARAMETERS = RunParameters()
VARIANT_PARAMETERS = RunParameters(
    run_name="variant-run",
    instance_types=("g6.xlarge", "g5.2xlarge"),
    ami="ami-0123456789abcdef0",
    python="/usr/local/bin/python3",
    root_volume_gb=200,
    data_source="s3://my-data-bucket/datasets/digits",
    keep_bucket=False,
    log_retention_days=7,
    checkpoint_every_steps=25,
    keep_checkpoints=3,
    poll_interval_seconds=1.0,
    max_crash_restarts=1,
    max_restarts_without_progress=5,
    heartbeat_timeout_seconds=600.0,
    lease_ttl_seconds=120.0,
    max_runtime_hours=2.0,
)
SHUTDOWN_LINE = "${SPOTRUN_SHUTDOWN_COMMAND:-shutdown -h now}"
# Actions that change objects or the bucket. A statement grants one of them when one of
# its action patterns matches it as an IAM wildcard.
S3_WRITE_ACTIONS = ("s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
                    "s3:PutObjectAcl", "s3:DeleteObjectVersion", "s3:RestoreObject",
                    "s3:PutBucketPolicy", "s3:DeleteBucket")


@dataclass(frozen=True)
class Synthesized:
    """A synthesized TrainingStack with its parameters and template."""

    params: RunParameters
    stack: TrainingStack
    template: Template
    resources: dict[str, dict]

    def logical_id(self, construct: Any) -> str:
        return self.stack.get_logical_id(construct.node.default_child)

    def resolve(self, value: Any) -> str:
        """Render a token of this stack as text in the notation of `render`."""
        return render(self.stack.resolve(value))

    def only(self, resource_type: str) -> dict:
        found = [resource for resource in self.resources.values()
                 if resource["Type"] == resource_type]
        assert len(found) == 1, f"expected one {resource_type}, found {len(found)}"
        return found[0]


def synthesize(params: RunParameters) -> Synthesized:
    app = cdk.App()
    stack = TrainingStack(app, f"Spotrun-{params.run_name}", params=params)
    template = Template.from_stack(stack)
    return Synthesized(params=params, stack=stack, template=template,
                       resources=template.to_json()["Resources"])


@pytest.fixture(scope="module")
def default_run() -> Synthesized:
    return synthesize(DEFAULT_PARAMETERS)


@pytest.fixture(scope="module")
def variant_run() -> Synthesized:
    return synthesize(VARIANT_PARAMETERS)


@pytest.fixture(params=["default_run", "variant_run"])
def run(request: pytest.FixtureRequest) -> Synthesized:
    """Each of the two synthesized stacks in turn."""
    return request.getfixturevalue(request.param)


def render(value: Any) -> str:
    """Render a CloudFormation value as text: Ref X -> ${X}, GetAtt X.Y -> ${X.Y}.

    Fn::Join is joined and Fn::Sub keeps its ${...} template text, so a rendered ARN
    reads like "arn:${AWS::Partition}:s3:::${RunBucket1234.Arn}/runs/...".
    """
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, dict) and len(value) == 1:
        function, argument = next(iter(value.items()))
        if function == "Fn::Join":
            separator, parts = argument
            return separator.join(render(part) for part in parts)
        if function == "Ref":
            return "${" + argument + "}"
        if function == "Fn::GetAtt":
            return "${" + ".".join(argument) + "}"
        if function == "Fn::Sub" and isinstance(argument, str):
            return argument
    raise ValueError(f"cannot render CloudFormation value {json.dumps(value)}")


def user_data(run: Synthesized) -> str:
    """Return the launch template's user-data script with tokens rendered as ${...}."""
    data = run.only("AWS::EC2::LaunchTemplate")["Properties"]["LaunchTemplateData"]
    encoded = data["UserData"]
    assert set(encoded) == {"Fn::Base64"}
    return render(encoded["Fn::Base64"])


def run_config(run: Synthesized) -> dict:
    """Return the run configuration document embedded in the user-data heredoc."""
    lines = user_data(run).splitlines()
    start = lines.index(f"cat > run-config.json <<'{CONFIG_DELIMITER}'")
    end = lines.index(CONFIG_DELIMITER, start + 1)
    return json.loads("\n".join(lines[start + 1:end]))


def instance_role_statements(run: Synthesized) -> list[dict]:
    """Return every policy statement attached to the instance role."""
    role_id = run.logical_id(run.stack.role)
    role = run.resources[role_id]
    assert "ManagedPolicyArns" not in role["Properties"]
    statements = []
    for policy in role["Properties"].get("Policies", []):
        statements += policy["PolicyDocument"]["Statement"]
    for resource in run.resources.values():
        if resource["Type"] != "AWS::IAM::Policy":
            continue
        if {"Ref": role_id} in resource["Properties"].get("Roles", []):
            statements += resource["Properties"]["PolicyDocument"]["Statement"]
    assert statements, "the instance role has no policy statements"
    return statements


def as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def grants_any(statement: dict, actions: tuple[str, ...]) -> bool:
    patterns = [pattern.lower() for pattern in as_list(statement.get("Action", []))]
    return any(fnmatch.fnmatchcase(action.lower(), pattern)
               for pattern in patterns for action in actions)


def launch_template_data(run: Synthesized) -> dict:
    return run.only("AWS::EC2::LaunchTemplate")["Properties"]["LaunchTemplateData"]


# Launch template ------------------------------------------------------------------


def test_launch_template_requires_imdsv2_tokens(default_run: Synthesized) -> None:
    default_run.template.has_resource_properties("AWS::EC2::LaunchTemplate", {
        "LaunchTemplateData": Match.object_like({
            "MetadataOptions": Match.object_like({"HttpTokens": "required"})})})


def test_launch_template_metadata_hop_limit_one(default_run: Synthesized) -> None:
    options = launch_template_data(default_run)["MetadataOptions"]

    assert options["HttpPutResponseHopLimit"] == 1
    assert options.get("HttpEndpoint", "enabled") == "enabled"


def test_launch_template_shutdown_terminates(default_run: Synthesized) -> None:
    data = launch_template_data(default_run)

    assert data["InstanceInitiatedShutdownBehavior"] == "terminate"


def test_launch_template_root_volume_encrypted_gp3(run: Synthesized) -> None:
    mappings = launch_template_data(run)["BlockDeviceMappings"]

    assert len(mappings) == 1
    assert mappings[0]["DeviceName"] == "/dev/xvda"
    ebs = mappings[0]["Ebs"]
    assert ebs["Encrypted"] is True
    assert ebs["VolumeType"] == "gp3"
    assert ebs["VolumeSize"] == run.params.root_volume_gb
    assert ebs["DeleteOnTermination"] is True


def test_launch_template_has_no_key_pair(run: Synthesized) -> None:
    assert "KeyName" not in launch_template_data(run)
    run.template.resource_count_is("AWS::EC2::KeyPair", 0)


def test_launch_template_default_ami_resolves_ssm(default_run: Synthesized) -> None:
    image_id = launch_template_data(default_run)["ImageId"]

    assert image_id == f"resolve:ssm:{DEFAULT_PARAMETERS.ami}"


def test_launch_template_ami_id_used_verbatim(variant_run: Synthesized) -> None:
    image_id = launch_template_data(variant_run)["ImageId"]

    assert image_id == "ami-0123456789abcdef0"
    # An AMI id needs no SSM lookup, so no parameter may be added for it.
    parameters = variant_run.template.to_json().get("Parameters", {})
    assert [name for name in parameters if name != "BootstrapVersion"] == []


# Network --------------------------------------------------------------------------


def test_security_group_has_no_ingress(run: Synthesized) -> None:
    group = run.only("AWS::EC2::SecurityGroup")

    assert "SecurityGroupIngress" not in group["Properties"]
    run.template.resource_count_is("AWS::EC2::SecurityGroupIngress", 0)


def test_multi_node_group_allows_tcp_among_instances(options_run: Synthesized) -> None:
    security_group_id = options_run.logical_id(options_run.stack.node.find_child(
        "InstanceSecurityGroup"))
    ingress = options_run.only("AWS::EC2::SecurityGroupIngress")["Properties"]

    assert OPTIONS_PARAMETERS.nodes == 2
    assert ingress["IpProtocol"] == "tcp"
    assert (ingress["FromPort"], ingress["ToPort"]) == (0, 65535)
    assert ingress["GroupId"] == {"Fn::GetAtt": [security_group_id, "GroupId"]}
    assert ingress["SourceSecurityGroupId"] == {"Fn::GetAtt": [security_group_id, "GroupId"]}
    assert "CidrIp" not in ingress
    assert group_properties(options_run)["MaxSize"] == "2"


def test_vpc_has_no_nat_gateway(default_run: Synthesized) -> None:
    default_run.template.resource_count_is("AWS::EC2::NatGateway", 0)
    default_run.template.resource_count_is("AWS::EC2::EIP", 0)


def test_vpc_has_s3_gateway_endpoint(default_run: Synthesized) -> None:
    endpoint = default_run.only("AWS::EC2::VPCEndpoint")["Properties"]

    assert endpoint["VpcEndpointType"] == "Gateway"
    assert render(endpoint["ServiceName"]) == "com.amazonaws.${AWS::Region}.s3"
    vpc_id = default_run.logical_id(default_run.stack.node.find_child("Vpc"))
    assert endpoint["VpcId"] == {"Ref": vpc_id}
    # Every subnet route table must route S3 traffic through the endpoint.
    route_tables = [{"Ref": logical_id} for logical_id, resource in
                    default_run.resources.items()
                    if resource["Type"] == "AWS::EC2::RouteTable"]
    assert route_tables
    assert sorted(map(json.dumps, endpoint["RouteTableIds"])) == \
        sorted(map(json.dumps, route_tables))


# Run bucket -----------------------------------------------------------------------


def test_bucket_encrypted_by_default(default_run: Synthesized) -> None:
    bucket = default_run.only("AWS::S3::Bucket")["Properties"]
    rules = bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"]

    assert len(rules) == 1
    algorithm = rules[0]["ServerSideEncryptionByDefault"]["SSEAlgorithm"]
    assert algorithm in ("AES256", "aws:kms")


def test_bucket_blocks_all_public_access(default_run: Synthesized) -> None:
    default_run.template.has_resource_properties("AWS::S3::Bucket", {
        "PublicAccessBlockConfiguration": {
            "BlockPublicAcls": True,
            "BlockPublicPolicy": True,
            "IgnorePublicAcls": True,
            "RestrictPublicBuckets": True,
        }})


def test_bucket_policy_denies_insecure_transport(default_run: Synthesized) -> None:
    bucket_id = default_run.logical_id(default_run.stack.bucket)
    policy = default_run.only("AWS::S3::BucketPolicy")["Properties"]
    assert policy["Bucket"] == {"Ref": bucket_id}

    denials = [statement for statement in policy["PolicyDocument"]["Statement"]
               if statement["Effect"] == "Deny"
               and statement.get("Condition") == {"Bool": {"aws:SecureTransport": "false"}}]
    assert len(denials) == 1
    denial = denials[0]
    assert denial["Principal"] == {"AWS": "*"}
    assert denial["Action"] in ("s3:*", ["s3:*"])
    resources = sorted(render(resource) for resource in as_list(denial["Resource"]))
    assert resources == [f"${{{bucket_id}.Arn}}", f"${{{bucket_id}.Arn}}/*"]


def test_bucket_aborts_incomplete_multipart_uploads(default_run: Synthesized) -> None:
    bucket = default_run.only("AWS::S3::Bucket")["Properties"]
    rules = bucket["LifecycleConfiguration"]["Rules"]

    aborting = [rule for rule in rules if "AbortIncompleteMultipartUpload" in rule]
    assert len(aborting) == 1
    assert aborting[0]["Status"] == "Enabled"
    assert aborting[0]["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] >= 1
    # The rule must cover the whole bucket, not a prefix or tag subset.
    assert "Prefix" not in aborting[0]
    assert "TagFilters" not in aborting[0]


def test_bucket_retained_when_keep_bucket(default_run: Synthesized) -> None:
    assert DEFAULT_PARAMETERS.keep_bucket is True
    bucket = default_run.only("AWS::S3::Bucket")

    assert bucket["DeletionPolicy"] == "Retain"
    assert bucket["UpdateReplacePolicy"] == "Retain"


def test_bucket_deleted_without_keep_bucket(variant_run: Synthesized) -> None:
    assert VARIANT_PARAMETERS.keep_bucket is False
    bucket = variant_run.only("AWS::S3::Bucket")

    assert bucket["DeletionPolicy"] == "Delete"


# Auto Scaling group ---------------------------------------------------------------


def test_group_uses_price_capacity_optimized_spot(run: Synthesized) -> None:
    policy = run.only("AWS::AutoScaling::AutoScalingGroup")["Properties"]["MixedInstancesPolicy"]
    distribution = policy["InstancesDistribution"]

    assert distribution["SpotAllocationStrategy"] == "price-capacity-optimized"
    assert distribution["OnDemandBaseCapacity"] == 0
    assert distribution["OnDemandPercentageAboveBaseCapacity"] == 0


def test_group_overrides_every_instance_type(run: Synthesized) -> None:
    policy = run.only("AWS::AutoScaling::AutoScalingGroup")["Properties"]["MixedInstancesPolicy"]
    overrides = policy["LaunchTemplate"]["Overrides"]

    assert [override["InstanceType"] for override in overrides] == \
        list(run.params.instance_types)
    template_id = run.logical_id(run.stack.node.find_child("LaunchTemplate"))
    specification = policy["LaunchTemplate"]["LaunchTemplateSpecification"]
    assert specification["LaunchTemplateId"] == {"Ref": template_id}


def test_group_size_min0_max1_desired1(default_run: Synthesized) -> None:
    group = default_run.only("AWS::AutoScaling::AutoScalingGroup")["Properties"]

    assert int(group["MinSize"]) == 0
    assert int(group["MaxSize"]) == 1
    assert int(group["DesiredCapacity"]) == 1


def test_group_has_explicit_run_name(run: Synthesized) -> None:
    group = run.only("AWS::AutoScaling::AutoScalingGroup")["Properties"]

    assert group["AutoScalingGroupName"] == f"spotrun-{run.params.run_name}"


# Instance role --------------------------------------------------------------------


def test_role_has_no_wildcard_admin_statement(run: Synthesized) -> None:
    for statement in instance_role_statements(run):
        actions = as_list(statement.get("Action", []))
        resources = as_list(statement.get("Resource", []))
        if "*" in resources:
            broad_actions = {"*", "s3:*"} & set(actions)
            assert not broad_actions, f"statement allows {sorted(broad_actions)} on *: {statement}"
        assert "NotAction" not in statement
        assert "NotResource" not in statement


def test_role_s3_writes_scoped_to_run_prefix(run: Synthesized) -> None:
    bucket_id = run.logical_id(run.stack.bucket)
    expected = f"${{{bucket_id}.Arn}}/runs/{run.params.run_name}/*"

    writes = [statement for statement in instance_role_statements(run)
              if statement["Effect"] == "Allow" and grants_any(statement, S3_WRITE_ACTIONS)]
    assert writes, "the instance role cannot write checkpoints"
    for statement in writes:
        resources = [render(resource) for resource in as_list(statement["Resource"])]
        assert resources == [expected], f"S3 write outside the run prefix: {statement}"


def test_role_autoscaling_scoped_to_own_group(run: Synthesized) -> None:
    expected = ("arn:${AWS::Partition}:autoscaling:${AWS::Region}:${AWS::AccountId}:"
                f"autoScalingGroup:*:autoScalingGroupName/spotrun-{run.params.run_name}")

    statements = [statement for statement in instance_role_statements(run)
                  if any(action.lower().startswith("autoscaling:")
                         for action in as_list(statement["Action"]))]
    assert statements, "the instance role cannot change its group's capacity"
    actions = set()
    for statement in statements:
        resources = [render(resource) for resource in as_list(statement["Resource"])]
        assert resources == [expected]
        actions.update(as_list(statement["Action"]))
    assert "autoscaling:SetDesiredCapacity" in actions


def test_role_reads_s3_data_source_prefix(variant_run: Synthesized) -> None:
    statements = instance_role_statements(variant_run)

    readers = [render(resource) for statement in statements
               if grants_any(statement, ("s3:GetObject",))
               for resource in as_list(statement["Resource"])]
    assert "arn:${AWS::Partition}:s3:::my-data-bucket/datasets/digits/*" in readers
    listers = [render(resource) for statement in statements
               if grants_any(statement, ("s3:ListBucket",))
               for resource in as_list(statement["Resource"])]
    assert "arn:${AWS::Partition}:s3:::my-data-bucket" in listers
    # Reading the data source must not grant writing to it.
    for statement in statements:
        if grants_any(statement, S3_WRITE_ACTIONS):
            for resource in as_list(statement["Resource"]):
                assert "my-data-bucket" not in render(resource)


# Logs and other resources ---------------------------------------------------------


def test_log_group_retention_matches_parameter(run: Synthesized) -> None:
    group = run.only("AWS::Logs::LogGroup")["Properties"]

    assert group["RetentionInDays"] == run.params.log_retention_days
    assert group["LogGroupName"] == f"/spotrun/{run.params.run_name}"


def test_template_has_no_lambda_function(run: Synthesized) -> None:
    run.template.resource_count_is("AWS::Lambda::Function", 0)
    custom = [resource["Type"] for resource in run.resources.values()
              if resource["Type"].startswith("Custom::")
              or resource["Type"] == "AWS::CloudFormation::CustomResource"]
    assert custom == []


# User-data ------------------------------------------------------------------------


def test_user_data_contains_run_config(run: Synthesized, tmp_path: Path) -> None:
    config = run_config(run)

    assert config["run_id"] == run.params.run_name
    assert config["group_name"] == f"spotrun-{run.params.run_name}"
    assert config["bucket"] == "${" + run.logical_id(run.stack.bucket) + "}"
    assert config["max_runtime_seconds"] == run.params.max_runtime_hours * 3600
    assert config["train_command"] == list(run.params.train_command)
    # Every setting that RunConfig shares with RunParameters must be passed through.
    shared = ({field.name for field in fields(RunConfig)}
              & {field.name for field in fields(RunParameters)}) - {"train_command", "min_nodes"}
    assert "checkpoint_every_steps" in shared
    for name in sorted(shared):
        assert config[name] == getattr(run.params, name), name
    # 0 in cdk.json means "all nodes"; the instance gets the number.
    assert config["min_nodes"] == run.params.effective_min_nodes
    # The supervisor must accept the document as it is written on the instance.
    path = tmp_path / "run-config.json"
    path.write_text(json.dumps(config))
    assert RunConfig.from_file(path).run_id == run.params.run_name


def test_user_data_starts_bootstrap_with_config(run: Synthesized) -> None:
    lines = [line.strip() for line in user_data(run).splitlines()]

    assert f"cat > run-config.json <<'{CONFIG_DELIMITER}'" in lines
    starts = [line for line in lines if "-m bootstrap --config" in line]
    assert starts == ['(cd code && "$SPOTRUN_PYTHON" -m bootstrap --config ../run-config.json)']
    assert f'export SPOTRUN_PYTHON="${{SPOTRUN_PYTHON:-{run.params.python}}}"' in lines


def test_user_data_downloads_code_bundle(run: Synthesized) -> None:
    script = user_data(run)
    code_uri = run.resolve(run.stack.code_asset.s3_object_url)

    assert code_uri.startswith("s3://")
    assert code_uri.endswith(".zip")
    assert f"'{code_uri}' code.zip" in script
    assert "-m zipfile -e code.zip code" in script


def test_user_data_powers_off_on_exit(run: Synthesized) -> None:
    script = user_data(run)
    lines = script.splitlines()

    assert f"trap '{SHUTDOWN_LINE}' EXIT" in lines[:6]
    assert script.count(SHUTDOWN_LINE) == 1


def test_user_data_local_data_is_asset(default_run: Synthesized) -> None:
    config = run_config(default_run)

    data_asset = default_run.stack.data_asset
    assert data_asset is not None
    assert config["data_zip_uri"] == default_run.resolve(data_asset.s3_object_url)
    assert config["data_prefix_uri"] == ""


def test_user_data_s3_data_source_is_prefix(variant_run: Synthesized) -> None:
    config = run_config(variant_run)

    assert variant_run.stack.data_asset is None
    assert variant_run.stack.node.try_find_child("TrainingData") is None
    assert config["data_prefix_uri"] == "s3://my-data-bucket/datasets/digits"
    assert config["data_zip_uri"] == ""


# Options: existing VPC, several nodes, notifications, fallback, drill ---------------

SYNTH_TIME = datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=timezone.utc)
OPTIONS_PARAMETERS = RunParameters(
    run_name="options-run",
    max_runtime_hours=2.5,
    notification_email="ml-team@example.com",
    nodes=2,
    gpus_per_node=8,
    vpc_id="vpc-0123456789abcdef0",
    subnet_ids=("subnet-0123456789abcdef0", "subnet-12345678"),
    on_demand_fallback=True,
    capacity_rebalance=True,
    fis_drill=True,
)


@pytest.fixture(scope="module")
def options_run() -> Synthesized:
    app = cdk.App()
    stack = TrainingStack(app, "Spotrun-options-run", params=OPTIONS_PARAMETERS,
                          now=SYNTH_TIME)
    template = Template.from_stack(stack)
    return Synthesized(params=OPTIONS_PARAMETERS, stack=stack, template=template,
                       resources=template.to_json()["Resources"])


@pytest.fixture(params=["default_run", "variant_run", "options_run"])
def any_run(request: pytest.FixtureRequest) -> Synthesized:
    """Each of the three synthesized stacks in turn."""
    return request.getfixturevalue(request.param)


def group_properties(run: Synthesized) -> dict:
    return run.only("AWS::AutoScaling::AutoScalingGroup")["Properties"]


def role_statements(run: Synthesized, role_id: str) -> list[dict]:
    """Return the statements of every AWS::IAM::Policy attached to one role."""
    statements = []
    for resource in run.resources.values():
        if (resource["Type"] == "AWS::IAM::Policy"
                and {"Ref": role_id} in resource["Properties"]["Roles"]):
            statements += resource["Properties"]["PolicyDocument"]["Statement"]
    return statements


def role_ids_trusting(run: Synthesized, service: str) -> list[str]:
    found = []
    for logical_id, resource in run.resources.items():
        if resource["Type"] != "AWS::IAM::Role":
            continue
        trust = resource["Properties"]["AssumeRolePolicyDocument"]["Statement"]
        if any(statement["Principal"].get("Service") == service for statement in trust):
            found.append(logical_id)
    return found


def rule_with_detail_type(run: Synthesized, detail_type: str) -> dict:
    rules = [resource["Properties"] for resource in run.resources.values()
             if resource["Type"] == "AWS::Events::Rule"
             and detail_type in resource["Properties"]["EventPattern"]["detail-type"]]
    assert len(rules) == 1, f"expected one rule for {detail_type}, found {len(rules)}"
    return rules[0]


def test_group_size_is_nodes(any_run: Synthesized) -> None:
    group = group_properties(any_run)

    assert group["MinSize"] == "0"
    assert group["MaxSize"] == str(any_run.params.nodes)
    assert group["DesiredCapacity"] == str(any_run.params.nodes)


def test_group_capacity_rebalance_follows_parameter(any_run: Synthesized) -> None:
    group = group_properties(any_run)

    assert group.get("CapacityRebalance", False) is any_run.params.capacity_rebalance


def test_group_spot_only_distribution(any_run: Synthesized) -> None:
    distribution = group_properties(any_run)["MixedInstancesPolicy"]["InstancesDistribution"]

    # The On-Demand fallback changes the distribution at run time, never in the template.
    assert distribution["OnDemandBaseCapacity"] == 0
    assert distribution["OnDemandPercentageAboveBaseCapacity"] == 0
    assert distribution["SpotAllocationStrategy"] == "price-capacity-optimized"


def test_group_notifies_run_topic(any_run: Synthesized) -> None:
    topic_id = any_run.logical_id(any_run.stack.topic)
    notifications = group_properties(any_run)["NotificationConfigurations"]

    assert len(notifications) == 1
    assert notifications[0]["TopicARN"] == {"Ref": topic_id}
    assert "autoscaling:EC2_INSTANCE_LAUNCH_ERROR" in notifications[0]["NotificationTypes"]


def test_existing_vpc_used_without_lookup(options_run: Synthesized) -> None:
    options_run.template.resource_count_is("AWS::EC2::VPC", 0)
    options_run.template.resource_count_is("AWS::EC2::Subnet", 0)
    options_run.template.resource_count_is("AWS::EC2::VPCEndpoint", 0)
    group = group_properties(options_run)
    security_group = options_run.only("AWS::EC2::SecurityGroup")["Properties"]

    assert group["VPCZoneIdentifier"] == list(OPTIONS_PARAMETERS.subnet_ids)
    assert security_group["VpcId"] == OPTIONS_PARAMETERS.vpc_id


def test_role_writes_only_run_log_group(any_run: Synthesized) -> None:
    name = f"/spotrun/{any_run.params.run_name}"
    prefix = "arn:${AWS::Partition}:logs:${AWS::Region}:${AWS::AccountId}:log-group:"

    statements = [statement for statement in instance_role_statements(any_run)
                  if any(action.startswith("logs:") for action in as_list(statement["Action"]))]
    assert len(statements) == 1
    assert sorted(as_list(statements[0]["Action"])) == [
        "logs:CreateLogStream", "logs:DescribeLogStreams", "logs:PutLogEvents"]
    resources = sorted(render(resource) for resource in as_list(statements[0]["Resource"]))
    assert resources == [prefix + name, prefix + name + ":*"]


def test_role_publishes_only_run_topic(any_run: Synthesized) -> None:
    topic_id = any_run.logical_id(any_run.stack.topic)

    statements = [statement for statement in instance_role_statements(any_run)
                  if any(action.startswith("sns:") for action in as_list(statement["Action"]))]
    assert len(statements) == 1
    assert as_list(statements[0]["Action"]) == ["sns:Publish"]
    assert as_list(statements[0]["Resource"]) == [{"Ref": topic_id}]


def test_role_reads_only_asset_objects(any_run: Synthesized) -> None:
    stack = any_run.stack
    assets = [stack.code_asset] + ([stack.data_asset] if stack.data_asset else [])
    expected = sorted(any_run.resolve(asset.bucket.arn_for_objects(asset.s3_object_key))
                      for asset in assets)

    statements = [statement for statement in instance_role_statements(any_run)
                  if statement.get("Sid") == "AssetRead"]
    assert len(statements) == 1
    assert as_list(statements[0]["Action"]) == ["s3:GetObject"]
    resources = sorted(render(resource) for resource in as_list(statements[0]["Resource"]))
    assert resources == expected
    assert all(not resource.endswith("/*") for resource in resources)


def test_no_wildcard_action_on_any_resource(any_run: Synthesized) -> None:
    statements = []
    for resource in any_run.resources.values():
        if resource["Type"] == "AWS::IAM::Policy":
            statements += resource["Properties"]["PolicyDocument"]["Statement"]
        for policy in resource["Properties"].get("Policies", []) if resource["Type"] == \
                "AWS::IAM::Role" else []:
            statements += policy["PolicyDocument"]["Statement"]
    assert statements
    for statement in statements:
        if statement["Effect"] != "Allow":
            continue
        for action in as_list(statement["Action"]):
            assert "*" not in action, f"wildcard action in {statement}"


def test_spot_warnings_forwarded_to_topic(any_run: Synthesized) -> None:
    rule = rule_with_detail_type(any_run, "EC2 Spot Instance Interruption Warning")
    topic_id = any_run.logical_id(any_run.stack.topic)

    assert rule["EventPattern"] == {
        "source": ["aws.ec2"],
        "detail-type": ["EC2 Spot Instance Interruption Warning",
                        "EC2 Instance Rebalance Recommendation"]}
    assert [target["Arn"] for target in rule["Targets"]] == [{"Ref": topic_id}]
    template = rule["Targets"][0]["InputTransformer"]["InputTemplate"]
    assert f"spotrun run {any_run.params.run_name}" in template
    assert "<detail-instance-id>" in template


def test_topic_policy_lets_eventbridge_publish(default_run: Synthesized) -> None:
    topic_id = default_run.logical_id(default_run.stack.topic)
    policy = default_run.only("AWS::SNS::TopicPolicy")["Properties"]

    allowed = [statement for statement in policy["PolicyDocument"]["Statement"]
               if statement["Effect"] == "Allow"
               and statement["Principal"] == {"Service": "events.amazonaws.com"}]
    assert len(allowed) == 1
    assert allowed[0]["Action"] == "sns:Publish"
    assert allowed[0]["Resource"] == {"Ref": topic_id}


def test_launch_failures_filtered_to_group(any_run: Synthesized) -> None:
    rule = rule_with_detail_type(any_run, "EC2 Instance Launch Unsuccessful")

    assert rule["EventPattern"]["source"] == ["aws.autoscaling"]
    assert rule["EventPattern"]["detail"] == {
        "AutoScalingGroupName": [f"spotrun-{any_run.params.run_name}"]}
    expected_targets = 2 if any_run.params.on_demand_fallback else 1
    assert len(rule["Targets"]) == expected_targets


def test_fallback_absent_by_default(default_run: Synthesized) -> None:
    default_run.template.resource_count_is("AWS::SSM::Document", 0)
    assert role_ids_trusting(default_run, "ssm.amazonaws.com") == []


def test_fallback_sets_group_on_demand(options_run: Synthesized) -> None:
    document = options_run.only("AWS::SSM::Document")["Properties"]
    step = document["Content"]["mainSteps"][0]

    assert document["DocumentType"] == "Automation"
    assert step["action"] == "aws:executeAwsApi"
    assert step["inputs"]["Api"] == "UpdateAutoScalingGroup"
    assert step["inputs"]["AutoScalingGroupName"] == "spotrun-options-run"
    assert step["inputs"]["MixedInstancesPolicy"] == {"InstancesDistribution": {
        "OnDemandBaseCapacity": 0, "OnDemandPercentageAboveBaseCapacity": 100}}


def test_fallback_role_updates_only_group(options_run: Synthesized) -> None:
    (role_id,) = role_ids_trusting(options_run, "ssm.amazonaws.com")
    group_arn = ("arn:${AWS::Partition}:autoscaling:${AWS::Region}:${AWS::AccountId}:"
                 "autoScalingGroup:*:autoScalingGroupName/spotrun-options-run")

    statements = role_statements(options_run, role_id)
    updates = [statement for statement in statements
               if "autoscaling:UpdateAutoScalingGroup" in as_list(statement["Action"])]
    assert len(updates) == 1
    assert [render(resource) for resource in as_list(updates[0]["Resource"])] == [group_arn]
    passes = [statement for statement in statements
              if "iam:PassRole" in as_list(statement["Action"])]
    assert len(passes) == 1
    assert passes[0]["Condition"] == {
        "StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}


def test_max_runtime_schedule_at_deadline(options_run: Synthesized) -> None:
    schedule = options_run.only("AWS::Scheduler::Schedule")["Properties"]

    # 2030-01-02 03:04:05 plus 2.5 h of max_runtime_hours plus the 1 h margin.
    assert schedule["ScheduleExpression"] == "at(2030-01-02T06:34:05)"
    assert schedule["ScheduleExpressionTimezone"] in ("UTC", "Etc/UTC")
    assert schedule["FlexibleTimeWindow"] == {"Mode": "OFF"}
    assert schedule.get("State", "ENABLED") == "ENABLED"


def test_max_runtime_schedule_sets_capacity_zero(any_run: Synthesized) -> None:
    target = any_run.only("AWS::Scheduler::Schedule")["Properties"]["Target"]

    assert render(target["Arn"]) == \
        "arn:${AWS::Partition}:scheduler:::aws-sdk:autoscaling:setDesiredCapacity"
    assert json.loads(target["Input"]) == {
        "AutoScalingGroupName": f"spotrun-{any_run.params.run_name}", "DesiredCapacity": 0}


def test_max_runtime_role_sets_only_group(any_run: Synthesized) -> None:
    (role_id,) = role_ids_trusting(any_run, "scheduler.amazonaws.com")
    target = any_run.only("AWS::Scheduler::Schedule")["Properties"]["Target"]
    group_arn = ("arn:${AWS::Partition}:autoscaling:${AWS::Region}:${AWS::AccountId}:"
                 f"autoScalingGroup:*:autoScalingGroupName/spotrun-{any_run.params.run_name}")

    assert target["RoleArn"] == {"Fn::GetAtt": [role_id, "Arn"]}
    statements = role_statements(any_run, role_id)
    assert len(statements) == 1
    assert as_list(statements[0]["Action"]) == ["autoscaling:SetDesiredCapacity"]
    assert [render(resource) for resource in as_list(statements[0]["Resource"])] == [group_arn]


def test_fis_drill_absent_by_default(default_run: Synthesized) -> None:
    default_run.template.resource_count_is("AWS::FIS::ExperimentTemplate", 0)
    assert "FisDrillTemplateId" not in default_run.template.to_json()["Outputs"]


def test_fis_drill_targets_group_spot_instances(options_run: Synthesized) -> None:
    experiment = options_run.only("AWS::FIS::ExperimentTemplate")["Properties"]
    (action,) = experiment["Actions"].values()
    (target_name, target), = experiment["Targets"].items()

    assert action["ActionId"] == "aws:ec2:send-spot-instance-interruptions"
    assert action["Targets"] == {"SpotInstances": target_name}
    assert target["ResourceType"] == "aws:ec2:spot-instance"
    assert target["ResourceTags"] == {"aws:autoscaling:groupName": "spotrun-options-run"}
    assert target["Filters"] == [{"Path": "State.Name", "Values": ["running"]}]
    assert experiment["StopConditions"] == [{"Source": "none"}]
    assert experiment["Tags"]["spotrun:run"] == "options-run"
    outputs = options_run.template.to_json()["Outputs"]
    assert "FisDrillTemplateId" in outputs


def test_fis_role_interrupts_only_group(options_run: Synthesized) -> None:
    (role_id,) = role_ids_trusting(options_run, "fis.amazonaws.com")
    experiment = options_run.only("AWS::FIS::ExperimentTemplate")["Properties"]

    assert experiment["RoleArn"] == {"Fn::GetAtt": [role_id, "Arn"]}
    statements = {statement["Sid"]: statement for statement in
                  role_statements(options_run, role_id)}
    interrupt = statements["InterruptOwnGroupInstances"]
    assert interrupt["Action"] == "ec2:SendSpotInstanceInterruptions"
    assert interrupt["Condition"] == {"StringEquals": {
        "aws:ResourceTag/aws:autoscaling:groupName": "spotrun-options-run"}}
    assert statements["FindTargetInstances"]["Action"] == "ec2:DescribeInstances"
    assert set(statements) == {"InterruptOwnGroupInstances", "FindTargetInstances"}


def test_email_subscription_only_when_set(any_run: Synthesized) -> None:
    subscriptions = [resource["Properties"] for resource in any_run.resources.values()
                     if resource["Type"] == "AWS::SNS::Subscription"]

    if not any_run.params.notification_email:
        assert subscriptions == []
        return
    assert len(subscriptions) == 1
    assert subscriptions[0]["Protocol"] == "email"
    assert subscriptions[0]["Endpoint"] == any_run.params.notification_email
    assert subscriptions[0]["TopicArn"] == {"Ref": any_run.logical_id(any_run.stack.topic)}
