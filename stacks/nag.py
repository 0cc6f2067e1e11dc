"""cdk-nag AwsSolutions checks of the stack, and the findings accepted with a reason.

app.py applies the checks to every synth, so `cdk synth` and `cdk deploy` fail on a new
error finding that has no suppression here. Each suppression is attached to the one
resource it concerns and names the wildcard it accepts where the rule reports several.
Its reason states why the finding is acceptable for a training run.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import aws_cdk as cdk
from aws_cdk import Annotations
from cdk_nag import AwsSolutionsChecks, NagPackSuppression, NagSuppressions, RegexAppliesTo
from constructs import IConstruct

if TYPE_CHECKING:
    from stacks.training_stack import TrainingStack

GROUP_ARN_WILDCARD = ("The group ARN contains the group id, which AWS assigns at creation; "
                      "the name part pins the statement to this run's group only.")


def apply_checks(app: cdk.App) -> None:
    """Run the AwsSolutions rule pack on every stack of the app at synth."""
    cdk.Aspects.of(app).add(AwsSolutionsChecks(verbose=True))


def _suppress(construct: IConstruct, rule: str, reason: str,
              applies_to: list[str] | None = None) -> None:
    NagSuppressions.add_resource_suppressions(
        construct, [NagPackSuppression(id=rule, reason=reason, applies_to=applies_to)],
        apply_to_children=True)


def _group_arn_finding(stack: "TrainingStack") -> str:
    return ("Resource::arn:<AWS::Partition>:autoscaling:<AWS::Region>:<AWS::AccountId>:"
            f"autoScalingGroup:*:autoScalingGroupName/{stack.group_name}")


def add_nag_suppressions(stack: "TrainingStack") -> None:
    """Record the accepted AwsSolutions findings of a TrainingStack, each with its reason."""
    params = stack.params
    _suppress(stack.bucket, "AwsSolutions-S1",
              "Server access logs would need a second bucket that outlives every run. "
              "Only this run's instance role and the deployer write to the bucket; "
              "CloudTrail S3 data events are the account-wide audit for it.")
    if not params.vpc_id:
        _suppress(stack.node.find_child("Vpc"), "AwsSolutions-VPC7",
                  "The VPC holds only training instances whose security group admits no "
                  "inbound traffic. Flow logs would add a log group and cost per run; a "
                  "team that needs them deploys into its own VPC with vpc_id.")

    _suppress(stack.role, "AwsSolutions-IAM5",
              "Object keys are created at run time, so writes are granted on the run "
              "prefix runs/<run_name>/* of the run bucket and on no other key.",
              [f"Resource::<{stack.get_logical_id(stack.bucket.node.default_child)}.Arn>"
               f"/runs/{params.run_name}/*"])
    _suppress(stack.role, "AwsSolutions-IAM5", GROUP_ARN_WILDCARD, [_group_arn_finding(stack)])
    _suppress(stack.role, "AwsSolutions-IAM5",
              "The supervisor creates its log streams at run time; the :* suffix covers "
              "the streams of this run's log group and no other group.",
              ["Resource::arn:<AWS::Partition>:logs:<AWS::Region>:<AWS::AccountId>:"
               f"log-group:{stack.log_group_name}:*"])
    if stack.data_asset is None:
        _suppress(stack.role, "AwsSolutions-IAM5",
                  "The data_source parameter names an S3 prefix; the instance reads the "
                  "objects under that prefix and nothing else in that bucket.",
                  [RegexAppliesTo(regex=_regex_literal(
                      f"Resource::arn:<AWS::Partition>:s3:::{params.data_source[5:].rstrip('/')}/*"))])

    controls = stack.controls
    schedule_role = controls.max_runtime_schedule.node.try_find_child("Role") \
        or _scheduler_role(stack)
    _suppress(schedule_role, "AwsSolutions-IAM5", GROUP_ARN_WILDCARD, [_group_arn_finding(stack)])
    fallback_role = controls.node.try_find_child("OnDemandFallbackRole")
    if fallback_role is not None:
        _suppress(fallback_role, "AwsSolutions-IAM5", GROUP_ARN_WILDCARD,
                  [_group_arn_finding(stack)])
        _suppress(controls.launch_failures, "AwsSolutions-IAM5",
                  "EventBridge starts the $DEFAULT version of the fallback document; "
                  "the version suffix is the only wildcard, the document is this stack's.",
                  ["Resource::arn:<AWS::Partition>:ssm:<AWS::Region>:<AWS::AccountId>:"
                   f"automation-definition/<{stack.get_logical_id(controls.fallback_document)}>:*"])
    _suppress(stack.role, "AwsSolutions-IAM5",
              "ec2:DescribeSpotPriceHistory supports no resource-level permissions; the "
              "supervisor reads the spot price for the cost in its completion message.",
              ["Resource::*"])
    fis_role = controls.node.try_find_child("FisDrillRole")
    if fis_role is not None:
        _suppress(fis_role, "AwsSolutions-IAM5",
                  "FIS may interrupt any instance id, but the condition on the tag "
                  "aws:autoscaling:groupName limits it to this run's group.",
                  ["Resource::arn:<AWS::Partition>:ec2:<AWS::Region>:<AWS::AccountId>:"
                   "instance/*"])
        _suppress(fis_role, "AwsSolutions-IAM5",
                  "ec2:DescribeInstances supports no resource-level permissions; FIS "
                  "needs it to resolve the drill's target instances.",
                  ["Resource::*"])

    # cdk-nag cannot read the volumes of a launch template that the group references
    # through its mixed-instances policy.
    _suppress(stack.group, "CdkNagValidationFailure",
              "AwsSolutions-EC26 cannot resolve the launch template of the mixed-instances "
              "policy. The template's only volume is encrypted, which "
              "tests/test_stack.py asserts.")
    Annotations.of(stack.group).acknowledge_warning(
        "@aws-cdk/aws-autoscaling:desiredCapacitySet",
        "Each deployment sets the desired capacity to nodes on purpose: deploying starts "
        "or resumes the run.")
    for subnet in getattr(stack, "imported_subnets", []):
        Annotations.of(subnet).acknowledge_warning(
            "@aws-cdk/aws-ec2:noSubnetRouteTableId",
            "The stack adds no routes to an imported VPC, so it never reads route tables.")


def _scheduler_role(stack: "TrainingStack") -> IConstruct:
    """Return the role that aws_scheduler_targets creates once per stack and target."""
    roles = [child for child in stack.node.children
             if child.node.id.startswith("SchedulerRoleForTarget-")]
    if len(roles) != 1:
        raise RuntimeError(f"expected one scheduler target role, found {len(roles)}")
    return roles[0]


def _regex_literal(text: str) -> str:
    """Return a cdk-nag applies_to regex (/.../) that matches text exactly."""
    return f"/^{re.escape(text)}$/"


# checkov findings accepted for the stack, recorded in the template itself (checkov reads
# Metadata.checkov.skip of a CloudFormation resource), each with its reason.
CHECKOV_SKIPS = {
    "bucket": [
        ("CKV_AWS_18", "Server access logs would need a second bucket that outlives every "
                       "run; CloudTrail S3 data events are the account-wide audit."),
        ("CKV_AWS_21", "Checkpoints are immutable step folders committed by manifest; "
                       "versioning would keep every status and lease rewrite (one every "
                       "few seconds) and bill for them."),
    ],
    "log_group": [
        ("CKV_AWS_158", "CloudWatch Logs encrypts log groups at rest with service-managed "
                        "keys; a customer key would add cost and a key policy per run for "
                        "training logs that hold no secrets."),
    ],
    "topic": [
        ("CKV_AWS_26", "The topic carries run status messages only; a customer key would "
                       "need a key policy for EventBridge and Auto Scaling to publish."),
    ],
}


def add_checkov_skips(stack: "TrainingStack") -> None:
    """Attach the accepted checkov findings to the bucket, log group and topic."""
    for attribute, skips in CHECKOV_SKIPS.items():
        resource = getattr(stack, attribute).node.default_child
        resource.add_metadata("checkov", {"skip": [{"id": check_id, "comment": reason}
                                                   for check_id, reason in skips]})
