"""The local cloud's AWS endpoint: moto's HTTP server with two IAM gaps filled.

moto 5.2 evaluates IAM policies when INITIAL_NO_AUTH_ACTION_COUNT is set, with two gaps
that matter here, both filled before moto's own server starts:

* Every non-S3 request is authorized against the resource ``*``, so a policy scoped to
  one Auto Scaling group, log group or topic (the least privilege the stack grants)
  would be denied although AWS allows it. Auto Scaling, CloudWatch Logs and SNS
  requests get the ARN of the group, log stream or topic they name, as on AWS.
* A role trust policy with a service principal (``"Service": "ec2.amazonaws.com"``)
  makes AssumeRole fail with an internal error, so nothing can act as EC2 and hand an
  instance its role. The IAM user SERVICE_USERS names stands for that service: a role
  that trusts the service may be assumed by that user, and by nobody else through it.

Two CloudFormation gaps are filled too: moto deletes neither the AWS::EC2::RouteTable
nor the AWS::EC2::InternetGateway of a stack, so deleting the stack's VPC fails with
DependencyViolation and the gateway outlives the stack. Both get the delete handler
that subnets already have.

One S3 gap is filled as well: moto checks the If-Match and If-None-Match conditions of
PutObject and DeleteObject before it writes, without a lock, so two concurrent
conditional writes could both succeed. S3 guarantees that exactly one does, and the run
lease relies on it, so conditional writes are serialized here.

Run: ``python -m emulator.moto_server -H 127.0.0.1 -p PORT`` (the arguments of
``moto_server``). Set INITIAL_NO_AUTH_ACTION_COUNT in the environment to enforce IAM.
"""

from __future__ import annotations

import functools
import json
import sys
import threading
from typing import Any, Callable

from moto.autoscaling.responses import AutoScalingResponse
from moto.logs.responses import LogsResponse
from moto.s3.responses import S3Response
from moto.sns.responses import SNSResponse
from moto.ec2.models import ec2_backends
from moto.ec2.models.internet_gateways import InternetGateway
from moto.ec2.models.route_tables import RouteTable
from moto.iam.access_control import IAMRequestBase
from moto.server import main as moto_main

from emulator.cloud import EC2_SERVICE_USER

# IAM user name -> the AWS service principal it stands for in role trust policies.
SERVICE_USERS = {EC2_SERVICE_USER: "ec2.amazonaws.com"}


def _group_resource(self: AutoScalingResponse) -> str:
    """Return the ARN of the group named by an Auto Scaling request, else ``*``."""
    backend = self.autoscaling_backend
    group_name = self._get_param("AutoScalingGroupName")
    if group_name and group_name in backend.autoscaling_groups:
        return backend.autoscaling_groups[group_name].arn
    instance_id = self._get_param("InstanceId")
    if instance_id:
        for group in backend.autoscaling_groups.values():
            if any(state.instance.id == instance_id for state in group.instance_states):
                return group.arn
    return "*"


def _log_resource(self: LogsResponse) -> str:
    """Return the ARN of the log stream (or log group) a CloudWatch Logs request names."""
    group = self._get_param("logGroupName")
    if not group:
        return "*"
    prefix = f"arn:aws:logs:{self.region}:{self.current_account}:log-group:{group}"
    stream = self._get_param("logStreamName")
    return f"{prefix}:log-stream:{stream}" if stream else f"{prefix}:*"


def _topic_resource(self: SNSResponse) -> str:
    return self._get_param("TopicArn") or "*"


def _trusts_service(trust_policy: dict, service: str) -> bool:
    statements = trust_policy.get("Statement", [])
    if isinstance(statements, dict):
        statements = [statements]
    for statement in statements:
        actions = statement.get("Action", [])
        actions = [actions] if isinstance(actions, str) else actions
        services = statement.get("Principal", {}).get("Service", [])
        services = [services] if isinstance(services, str) else services
        if (statement.get("Effect") == "Allow" and service in services
                and any(action in ("sts:AssumeRole", "sts:*", "*") for action in actions)):
            return True
    return False


_original_trust_check = IAMRequestBase._check_role_trust_relationship


def _check_role_trust_relationship(self: IAMRequestBase, role_arn: str) -> bool:
    """Evaluate a role's trust policy, with service principals played by SERVICE_USERS."""
    caller_name = self._access_key.arn.rsplit("/", 1)[-1]
    role = self.backend.get_role_by_arn(role_arn)
    trust_policy = role.assume_role_policy_document
    if isinstance(trust_policy, str):
        trust_policy = json.loads(trust_policy)
    if caller_name in SERVICE_USERS:
        return _trusts_service(trust_policy, SERVICE_USERS[caller_name])
    try:
        return _original_trust_check(self, role_arn)
    except TypeError:
        # moto 5.2 raises here on a statement without an "AWS" principal: no match.
        return False


def _delete_route_table(cls, resource_name: str, cloudformation_json: dict,
                        account_id: str, region_name: str) -> None:
    """Delete a stack's route table with its subnet associations, as CloudFormation does."""
    backend = ec2_backends[account_id][region_name]
    route_table = backend.route_tables.get(resource_name)
    if route_table is None:
        return
    for association_id in list(route_table._associations):
        backend.disassociate_route_table(association_id)
    backend.delete_route_table(resource_name)


def _delete_internet_gateway(cls, resource_name: str, cloudformation_json: dict,
                             account_id: str, region_name: str) -> None:
    """Detach and delete a stack's internet gateway."""
    backend = ec2_backends[account_id][region_name]
    gateway = backend.internet_gateways.get(resource_name)
    if gateway is None:
        return
    if gateway.vpc is not None:
        backend.detach_internet_gateway(resource_name, gateway.vpc.id)
    backend.delete_internet_gateway(resource_name)


CONDITIONAL_HEADERS = ("If-Match", "If-None-Match")
_conditional_write_lock = threading.Lock()


def _serialize_conditional(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Run a write with an If-Match or If-None-Match condition under one lock."""

    @functools.wraps(handler)
    def serialized(self: S3Response, *args: Any, **kwargs: Any) -> Any:
        if not any(self.headers.get(name) for name in CONDITIONAL_HEADERS):
            return handler(self, *args, **kwargs)
        with _conditional_write_lock:
            return handler(self, *args, **kwargs)

    return serialized


def main() -> None:
    S3Response.put_object = _serialize_conditional(S3Response.put_object)
    S3Response.delete_object = _serialize_conditional(S3Response.delete_object)
    InternetGateway.delete_from_cloudformation_json = classmethod(_delete_internet_gateway)
    RouteTable.delete_from_cloudformation_json = classmethod(_delete_route_table)
    AutoScalingResponse._determine_resource = _group_resource
    LogsResponse._determine_resource = _log_resource
    SNSResponse._determine_resource = _topic_resource
    IAMRequestBase._check_role_trust_relationship = _check_role_trust_relationship
    moto_main(sys.argv[1:])


if __name__ == "__main__":
    main()
