"""The instance role on the local cloud, where moto enforces IAM: a missing permission
fails the run cleanly, and `cdk destroy` leaves none of the stack's resources behind.

One moto server and one `cdk bootstrap` serve the whole module, as in test_faults.py.
Each run deploys its own stack, trains a short digits job and destroys the stack.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from emulator.__main__ import Console, run_on_cloud, start_cloud
from emulator.cloud import LocalCloud
from emulator.scenario import parse_scenario

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHORT_TRAINING = {"train_command": ["{python}", "-m", "ml.digits", "--epochs", "3"],
                  "checkpoint_every_steps": 25}

pytestmark = pytest.mark.e2e
_run_numbers = itertools.count(1)


class UserCloud(LocalCloud):
    """A local cloud whose user empties a run bucket that is not kept before
    `cdk destroy`, as the README instructs, because CloudFormation deletes only an
    empty bucket."""

    def cdk(self, arguments: list[str], context: dict[str, object] | None = None,
            log_name: str = "cdk") -> str:
        if arguments[0] == "destroy" and (context or {}).get("keep_bucket") is False:
            empty_bucket(self, stack_output(self, arguments[1], "BucketName"))
        return super().cdk(arguments, context, log_name)


def stack_output(cloud: LocalCloud, stack_name: str, key: str) -> str:
    stack = cloud.client("cloudformation").describe_stacks(StackName=stack_name)["Stacks"][0]
    return {item["OutputKey"]: item["OutputValue"] for item in stack["Outputs"]}[key]


def empty_bucket(cloud: LocalCloud, bucket: str) -> None:
    s3 = cloud.client("s3")
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys})


def inventory(cloud: LocalCloud) -> dict[str, set[str]]:
    """Return the names of every resource kind the stack creates, listed by the admin."""
    ec2 = cloud.client("ec2")
    iam = cloud.client("iam")
    return {
        "vpcs": {vpc["VpcId"] for vpc in ec2.describe_vpcs()["Vpcs"] if not vpc["IsDefault"]},
        "security_groups": {group["GroupId"] for group in
                            ec2.describe_security_groups()["SecurityGroups"]
                            if group["GroupName"] != "default"},
        "launch_templates": {template["LaunchTemplateName"] for template in
                             ec2.describe_launch_templates()["LaunchTemplates"]},
        "groups": {group["AutoScalingGroupName"] for group in cloud.client("autoscaling")
                   .describe_auto_scaling_groups()["AutoScalingGroups"]},
        "roles": {role["RoleName"] for role in iam.list_roles()["Roles"]},
        "instance_profiles": {profile["InstanceProfileName"] for profile in
                              iam.list_instance_profiles()["InstanceProfiles"]},
        "topics": {topic["TopicArn"] for topic in cloud.client("sns").list_topics()["Topics"]},
        "log_groups": {group["logGroupName"] for group in
                       cloud.client("logs").describe_log_groups()["logGroups"]},
        "event_rules": {rule["Name"] for rule in cloud.client("events").list_rules()["Rules"]},
        "buckets": {bucket["Name"] for bucket in cloud.client("s3").list_buckets()["Buckets"]},
    }


def left_behind(before: dict[str, set[str]], after: dict[str, set[str]]) -> dict[str, set[str]]:
    return {kind: after[kind] - before[kind] for kind in after if after[kind] - before[kind]}


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("iam-cloud")
    local_cloud = UserCloud(work_dir / "cloud", PROJECT_ROOT)
    try:
        start_cloud(local_cloud, Console())
        yield local_cloud
    finally:
        local_cloud.stop()


def run(cloud: LocalCloud, tmp_path: Path, *, params: dict | None = None,
        revoke_actions: list[str] | None = None) -> dict:
    """Run one short job; return the report with the cloud's inventory before and after."""
    run_name = f"iam-{next(_run_numbers)}"
    scenario = parse_scenario({
        "description": run_name,
        "params": {"run_name": run_name, **SHORT_TRAINING, **(params or {})},
        "revoke_actions": revoke_actions or [],
        "timeout_seconds": 300,
    })
    before = inventory(cloud)
    report = run_on_cloud(cloud, scenario, tmp_path, Console())
    report["left_behind"] = left_behind(before, inventory(cloud))
    report["run_name"] = run_name
    return report


@pytest.fixture(scope="module")
def revoked_run(cloud, tmp_path_factory) -> dict:
    return run(cloud, tmp_path_factory.mktemp("revoked"), revoke_actions=["s3:DeleteObject"])


def read_status(cloud: LocalCloud, bucket: str, run_id: str) -> dict:
    body = cloud.client("s3").get_object(Bucket=bucket, Key=f"runs/{run_id}/status.json")
    return json.loads(body["Body"].read())


def test_revoked_delete_fails_run(revoked_run):
    assert revoked_run["status"] == "failed"
    assert revoked_run["run_state"] == "failed"
    assert "AccessDenied" in revoked_run["reason"]


def test_revoked_delete_records_error_code(cloud, revoked_run):
    (bucket,) = revoked_run["left_behind"]["buckets"]
    status = read_status(cloud, bucket, revoked_run["run_name"])

    assert status["state"] == "failed"
    assert status["error_code"] == "AccessDenied"
    crashes = [event for event in revoked_run["events"]
               if event["type"] == "bootstrap_crash"]
    assert [event["error_code"] for event in crashes] == ["AccessDenied"]


def test_revoked_run_ends_at_zero(revoked_run):
    assert revoked_run["instances_launched"] == 1
    assert revoked_run["asg_desired_capacity_at_end"] == 0
    assert revoked_run["running_instances_at_end"] == 0
    assert revoked_run["timed_out"] is False


def test_destroy_keeps_only_bucket(revoked_run):
    assert revoked_run["stack_deleted"] is True
    left = revoked_run["left_behind"]

    assert set(left) == {"buckets"}, left
    assert len(left["buckets"]) == 1


def test_destroy_removes_unkept_bucket(cloud, tmp_path):
    report = run(cloud, tmp_path, params={"keep_bucket": False})

    assert report["status"] == "completed", report["reason"]
    assert report["stack_deleted"] is True
    assert report["left_behind"] == {}
