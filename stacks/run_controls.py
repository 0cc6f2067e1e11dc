"""Account-side controls of a run: notifications, the maximum run time, the FIS drill
and the On-Demand fallback.

These resources act on the run's Auto Scaling group from outside the instances, so they
still work when an instance is gone or its supervisor is stuck. None of them uses a
Lambda function: EventBridge, EventBridge Scheduler, FIS and SSM Automation call the
AWS APIs themselves.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import jsii

from aws_cdk import (
    Stack,
    aws_autoscaling as autoscaling,
    aws_events as events,
    aws_events_targets as events_targets,
    aws_fis as fis,
    aws_iam as iam,
    aws_scheduler as scheduler,
    aws_scheduler_targets as scheduler_targets,
    aws_sns as sns,
    aws_sns_subscriptions as subscriptions,
    aws_ssm as ssm,
)
from constructs import Construct

from stacks.config import RunParameters

# The account-side stop fires this long after the instance-side limit, so that an
# instance that reached max_runtime_hours has time to save its checkpoint first.
MAX_RUNTIME_MARGIN = timedelta(hours=1)
# EventBridge detail types of the EC2 events that announce a spot interruption.
SPOT_WARNING_DETAIL_TYPES = ["EC2 Spot Instance Interruption Warning",
                             "EC2 Instance Rebalance Recommendation"]
LAUNCH_FAILED_DETAIL_TYPE = "EC2 Instance Launch Unsuccessful"
# FIS gives the instances this long between the notice and the interruption, as EC2 does.
FIS_NOTICE_DURATION = "PT2M"


def max_runtime_deadline(params: RunParameters, now: datetime) -> datetime:
    """Return when the account-side stop fires: synth time, run time limit, margin."""
    return (now.astimezone(timezone.utc) + timedelta(hours=params.max_runtime_hours)
            + MAX_RUNTIME_MARGIN).replace(microsecond=0)


class RunControls(Construct):
    """Notifications, the account-side maximum run time, the FIS drill and the fallback."""

    def __init__(self, scope: Construct, construct_id: str, *, params: RunParameters,
                 group: autoscaling.AutoScalingGroup, group_name: str, group_arn: str,
                 topic: sns.Topic, instance_role: iam.Role, now: datetime) -> None:
        super().__init__(scope, construct_id)
        self.params = params
        self.group = group
        self.group_name = group_name
        self.group_arn = group_arn
        self.topic = topic
        self.instance_role = instance_role
        self.fallback_document: ssm.CfnDocument | None = None

        if params.notification_email:
            topic.add_subscription(subscriptions.EmailSubscription(params.notification_email))
        self.spot_warnings = self._forward_spot_warnings()
        self.launch_failures = self._forward_launch_failures()
        self.deadline = max_runtime_deadline(params, now)
        self.max_runtime_schedule = self._max_runtime_schedule()
        self.fis_template = self._fis_drill() if params.fis_drill else None

    def _forward_spot_warnings(self) -> events.Rule:
        """Forward spot interruption warnings and rebalance recommendations to the topic.

        The events carry the instance id but not the Auto Scaling group, and an event
        pattern cannot look up tags, so the rule matches these events for every instance
        in the account and region. The message names the run so that a reader can tell
        which stack forwarded it.
        """
        rule = events.Rule(
            self, "SpotWarnings",
            description=f"spotrun run {self.params.run_name}: forward EC2 spot interruption "
                        f"warnings and rebalance recommendations (all instances in the "
                        f"region) to the run topic",
            event_pattern=events.EventPattern(source=["aws.ec2"],
                                              detail_type=SPOT_WARNING_DETAIL_TYPES))
        rule.add_target(events_targets.SnsTopic(self.topic, message=events.RuleTargetInput.from_text(
            f"spotrun run {self.params.run_name}: {events.EventField.from_path('$.detail-type')}"
            f" for instance {events.EventField.from_path('$.detail.instance-id')} in "
            f"{events.EventField.region}. The instance may belong to another group; this "
            f"run's group is {self.group_name}.")))
        return rule

    def _forward_launch_failures(self) -> events.Rule:
        """Notify the topic when the group cannot launch an instance (no spot capacity,
        quota, invalid AMI), and with on_demand_fallback switch the group to On-Demand.

        Unlike the spot warnings, these events name the group, so the rule matches this
        run's group only.
        """
        rule = events.Rule(
            self, "LaunchFailures",
            description=f"spotrun run {self.params.run_name}: failed launches in group "
                        f"{self.group_name}",
            event_pattern=events.EventPattern(
                source=["aws.autoscaling"], detail_type=[LAUNCH_FAILED_DETAIL_TYPE],
                detail={"AutoScalingGroupName": [self.group_name]}))
        rule.add_target(events_targets.SnsTopic(self.topic, message=events.RuleTargetInput.from_text(
            f"spotrun run {self.params.run_name}: group {self.group_name} could not launch "
            f"an instance: {events.EventField.from_path('$.detail.StatusMessage')}")))
        if self.params.on_demand_fallback:
            rule.add_target(_AutomationTarget(self._on_demand_automation()))
        return rule

    def _on_demand_automation(self) -> "_Automation":
        """Create an SSM Automation document that sets the group to 100 % On-Demand.

        An Auto Scaling group never falls back from Spot to On-Demand by itself. This
        document changes the instances distribution of the mixed-instances policy after
        a failed launch. The change lasts until the next deployment of the stack, which
        sets the distribution back to Spot only.
        """
        role = iam.Role(
            self, "OnDemandFallbackRole",
            assumed_by=iam.ServicePrincipal("ssm.amazonaws.com"),
            description=f"spotrun run {self.params.run_name}: switch the group to On-Demand")
        role.add_to_policy(iam.PolicyStatement(
            sid="UpdateOwnGroup", actions=["autoscaling:UpdateAutoScalingGroup"],
            resources=[self.group_arn]))
        # NOTE: not run on AWS yet. If UpdateAutoScalingGroup also requires launch
        # template permissions (ec2:RunInstances), the Automation execution reports the
        # denial and the group stays on Spot.
        role.add_to_policy(iam.PolicyStatement(
            sid="PassInstanceRole", actions=["iam:PassRole"],
            resources=[self.instance_role.role_arn],
            conditions={"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}))
        document = ssm.CfnDocument(
            self, "OnDemandFallback",
            document_type="Automation",
            content={
                "schemaVersion": "0.3",
                "description": f"Switch group {self.group_name} to On-Demand capacity.",
                "assumeRole": "{{ AutomationAssumeRole }}",
                "parameters": {"AutomationAssumeRole": {"type": "String"}},
                "mainSteps": [{
                    "name": "UseOnDemandCapacity",
                    "action": "aws:executeAwsApi",
                    "inputs": {
                        "Service": "autoscaling",
                        "Api": "UpdateAutoScalingGroup",
                        "AutoScalingGroupName": self.group_name,
                        "MixedInstancesPolicy": {"InstancesDistribution": {
                            "OnDemandBaseCapacity": 0,
                            "OnDemandPercentageAboveBaseCapacity": 100}},
                    },
                }],
            })
        self.fallback_document = document
        return _Automation(document=document, role=role)

    def _max_runtime_schedule(self) -> scheduler.Schedule:
        """Set the group's capacity to 0 at the deadline, from inside the account.

        A one-time EventBridge Scheduler schedule calls Auto Scaling SetDesiredCapacity
        through the universal target arn:aws:scheduler:::aws-sdk:autoscaling:setDesiredCapacity
        (the service name is the SDK's lower-case identifier, the action camelCase). The
        time is fixed at synth, so each deployment moves it.
        """
        target = scheduler_targets.Universal(
            service="autoscaling",
            action="setDesiredCapacity",
            input=scheduler.ScheduleTargetInput.from_object({
                "AutoScalingGroupName": self.group_name, "DesiredCapacity": 0}),
            policy_statements=[iam.PolicyStatement(
                actions=["autoscaling:SetDesiredCapacity"], resources=[self.group_arn])],
            retry_attempts=10)
        return scheduler.Schedule(
            self, "MaxRuntimeStop",
            description=f"spotrun run {self.params.run_name}: set group {self.group_name} to "
                        f"0 after max_runtime_hours={self.params.max_runtime_hours:g} plus "
                        f"{MAX_RUNTIME_MARGIN.total_seconds() / 3600:g} h",
            schedule=scheduler.ScheduleExpression.at(self.deadline),
            target=target)

    def _fis_drill(self) -> fis.CfnExperimentTemplate:
        """Create the opt-in FIS experiment template that interrupts this group's spot
        instances. It does nothing until someone starts an experiment from it."""
        stack = Stack.of(self)
        role = iam.Role(
            self, "FisDrillRole",
            assumed_by=iam.ServicePrincipal("fis.amazonaws.com"),
            description=f"spotrun run {self.params.run_name}: FIS spot interruption drill")
        role.add_to_policy(iam.PolicyStatement(
            sid="InterruptOwnGroupInstances",
            actions=["ec2:SendSpotInstanceInterruptions"],
            resources=[stack.format_arn(service="ec2", resource="instance",
                                        resource_name="*")],
            conditions={"StringEquals": {
                "aws:ResourceTag/aws:autoscaling:groupName": self.group_name}}))
        role.add_to_policy(iam.PolicyStatement(
            sid="FindTargetInstances", actions=["ec2:DescribeInstances"], resources=["*"]))
        return fis.CfnExperimentTemplate(
            self, "SpotInterruptionDrill",
            description=f"spotrun run {self.params.run_name}: spot interruption of the "
                        f"running instances of {self.group_name}",
            role_arn=role.role_arn,
            stop_conditions=[fis.CfnExperimentTemplate.ExperimentTemplateStopConditionProperty(
                source="none")],
            targets={"GroupSpotInstances": fis.CfnExperimentTemplate.ExperimentTemplateTargetProperty(
                resource_type="aws:ec2:spot-instance",
                resource_tags={"aws:autoscaling:groupName": self.group_name},
                filters=[fis.CfnExperimentTemplate.ExperimentTemplateTargetFilterProperty(
                    path="State.Name", values=["running"])],
                selection_mode="ALL")},
            actions={"InterruptSpotInstances": fis.CfnExperimentTemplate.ExperimentTemplateActionProperty(
                action_id="aws:ec2:send-spot-instance-interruptions",
                parameters={"durationBeforeInterruption": FIS_NOTICE_DURATION},
                targets={"SpotInstances": "GroupSpotInstances"})},
            tags={"spotrun:run": self.params.run_name, "Name": f"spotrun-{self.params.run_name}"})


class _Automation:
    """An SSM Automation document and the role it runs as."""

    def __init__(self, document: ssm.CfnDocument, role: iam.Role) -> None:
        self.document = document
        self.role = role


@jsii.implements(events.IRuleTarget)
class _AutomationTarget:
    """EventBridge rule target that starts an SSM Automation document."""

    def __init__(self, automation: _Automation) -> None:
        self._automation = automation

    def bind(self, rule: events.IRule, id: str | None = None) -> events.RuleTargetConfig:
        stack = Stack.of(rule)
        document_name = self._automation.document.ref
        definition_arn = stack.format_arn(
            service="ssm", resource="automation-definition",
            resource_name=f"{document_name}:$DEFAULT")
        invoke_role = iam.Role(
            rule, "StartAutomationRole",
            assumed_by=iam.ServicePrincipal("events.amazonaws.com"),
            description="start the On-Demand fallback automation")
        invoke_role.add_to_policy(iam.PolicyStatement(
            sid="StartFallbackAutomation", actions=["ssm:StartAutomationExecution"],
            resources=[stack.format_arn(service="ssm", resource="automation-definition",
                                        resource_name=f"{document_name}:*")]))
        invoke_role.add_to_policy(iam.PolicyStatement(
            sid="PassAutomationRole", actions=["iam:PassRole"],
            resources=[self._automation.role.role_arn],
            conditions={"StringEquals": {"iam:PassedToService": "ssm.amazonaws.com"}}))
        return events.RuleTargetConfig(
            arn=definition_arn, role=invoke_role,
            input=events.RuleTargetInput.from_object(
                {"AutomationAssumeRole": [self._automation.role.role_arn]}))
