"""The CloudFormation stack of one training run."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import jsii

from aws_cdk import (
    ArnFormat,
    CfnOutput,
    Duration,
    RemovalPolicy,
    Stack,
    aws_autoscaling as autoscaling,
    aws_ec2 as ec2,
    aws_iam as iam,
    aws_logs as logs,
    aws_s3 as s3,
    aws_s3_assets as s3_assets,
    aws_sns as sns,
)
from constructs import Construct

from bootstrap.config import RunConfig
from stacks.config import RunParameters
from stacks.nag import add_checkov_skips, add_nag_suppressions
from stacks.run_controls import RunControls
from stacks.user_data import render_user_data

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# The code bundle is the repository filtered down to the instance-side packages.
CODE_BUNDLE_EXCLUDES = ["*", ".*", "!bootstrap", "!bootstrap/**", "!ml", "!ml/**",
                        "**/__pycache__", "**/*.pyc"]


class TrainingStack(Stack):
    """Bucket, instance role, launch template and spot Auto Scaling group of one run.

    ``now`` is the synth time that the account-side maximum run time counts from;
    tests pass a fixed time.
    """

    def __init__(self, scope: Construct, construct_id: str, *, params: RunParameters,
                 now: datetime | None = None, **kwargs) -> None:
        super().__init__(scope, construct_id, **kwargs)
        self.params = params
        self.group_name = f"spotrun-{params.run_name}"
        self.group_arn = self.format_arn(
            service="autoscaling", resource="autoScalingGroup",
            resource_name=f"*:autoScalingGroupName/{self.group_name}",
            arn_format=ArnFormat.COLON_RESOURCE_NAME)

        self.bucket = self._run_bucket()
        self.code_asset = s3_assets.Asset(self, "CodeBundle", path=str(PROJECT_ROOT),
                                          exclude=CODE_BUNDLE_EXCLUDES)
        self.data_asset = self._data_asset()
        self.log_group_name = f"/spotrun/{params.run_name}"
        self.log_group = logs.LogGroup(
            self, "Logs", log_group_name=self.log_group_name,
            removal_policy=RemovalPolicy.DESTROY)
        self.log_group.node.default_child.retention_in_days = params.log_retention_days
        self.topic = sns.Topic(self, "Notifications", enforce_ssl=True)

        vpc = self._network()
        self.role = self._instance_role()
        security_group = self._security_group(vpc)
        launch_template = self._launch_template(security_group)
        self.group = self._auto_scaling_group(vpc, launch_template)
        self.controls = RunControls(
            self, "Controls", params=params, group=self.group, group_name=self.group_name,
            group_arn=self.group_arn, topic=self.topic, instance_role=self.role,
            now=now or datetime.now(timezone.utc))

        CfnOutput(self, "BucketName", value=self.bucket.bucket_name)
        CfnOutput(self, "GroupName", value=self.group_name)
        CfnOutput(self, "RunId", value=params.run_name)
        CfnOutput(self, "LogGroupName", value=self.log_group.log_group_name)
        CfnOutput(self, "TopicArn", value=self.topic.topic_arn)
        CfnOutput(self, "MaxRuntimeStopAt", value=self.controls.deadline.isoformat(),
                  description="UTC time at which a schedule sets the group to 0")
        if self.controls.fis_template is not None:
            CfnOutput(self, "FisDrillTemplateId", value=self.controls.fis_template.attr_id,
                      description="aws fis start-experiment --experiment-template-id <id>")
        add_nag_suppressions(self)
        add_checkov_skips(self)

    # Storage ----------------------------------------------------------------------

    def _run_bucket(self) -> s3.Bucket:
        # Objects in a kept bucket survive `cdk destroy`; a deleted bucket must be empty.
        removal = RemovalPolicy.RETAIN if self.params.keep_bucket else RemovalPolicy.DESTROY
        return s3.Bucket(
            self, "RunBucket",
            encryption=s3.BucketEncryption.S3_MANAGED,
            enforce_ssl=True,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            versioned=False,
            removal_policy=removal,
            lifecycle_rules=[s3.LifecycleRule(
                id="abort-incomplete-multipart-uploads",
                abort_incomplete_multipart_upload_after=Duration.days(1))],
        )

    def _data_asset(self) -> s3_assets.Asset | None:
        if self.params.data_source.startswith("s3://"):
            return None
        folder = Path(self.params.data_source)
        if not folder.is_absolute():
            folder = PROJECT_ROOT / folder
        return s3_assets.Asset(self, "TrainingData", path=str(folder))

    # Network ----------------------------------------------------------------------

    def _network(self) -> ec2.IVpc:
        if self.params.vpc_id:
            return self._existing_network()
        # Public subnets only, plus an S3 gateway endpoint: no NAT gateway to pay for.
        vpc = ec2.Vpc(
            self, "Vpc",
            max_azs=3,
            nat_gateways=0,
            subnet_configuration=[ec2.SubnetConfiguration(
                name="public", subnet_type=ec2.SubnetType.PUBLIC, cidr_mask=24)],
            # The default security-group restriction is a Lambda-backed custom resource.
            restrict_default_security_group=False,
        )
        vpc.add_gateway_endpoint("S3Endpoint", service=ec2.GatewayVpcEndpointAwsService.S3)
        return vpc

    def _existing_network(self) -> ec2.IVpc:
        """Import the VPC and subnets given by id; nothing is looked up at synth.

        The stack adds no endpoint or route to a VPC it does not own, so the subnets
        must already reach S3 (a public IP and an internet gateway, a NAT gateway or
        an S3 gateway endpoint).
        """
        self.imported_subnets = [
            ec2.Subnet.from_subnet_id(self, f"Subnet{index}", subnet_id)
            for index, subnet_id in enumerate(self.params.subnet_ids)]
        return ec2.Vpc.from_vpc_attributes(
            self, "Vpc", vpc_id=self.params.vpc_id,
            availability_zones=self.availability_zones)

    # Permissions ------------------------------------------------------------------

    def _instance_role(self) -> iam.Role:
        role = iam.Role(
            self, "InstanceRole",
            assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
            description=f"spotrun run {self.params.run_name}: training instances")
        # The instance reads exactly its asset objects, not the whole CDK asset bucket
        # (shared by every stack of the account) that Asset.grant_read would open.
        assets = [self.code_asset] + ([self.data_asset] if self.data_asset else [])
        role.add_to_policy(iam.PolicyStatement(
            sid="AssetRead", actions=["s3:GetObject"],
            resources=[asset.bucket.arn_for_objects(asset.s3_object_key) for asset in assets]))
        if self.data_asset is None:
            self._grant_data_prefix_read(role)

        run_prefix = f"runs/{self.params.run_name}/"
        role.add_to_policy(iam.PolicyStatement(
            sid="RunPrefixReadWrite",
            actions=["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                     "s3:AbortMultipartUpload"],
            resources=[self.bucket.arn_for_objects(f"{run_prefix}*")]))
        role.add_to_policy(iam.PolicyStatement(
            sid="RunPrefixList",
            actions=["s3:ListBucket"],
            resources=[self.bucket.bucket_arn]))
        role.add_to_policy(iam.PolicyStatement(
            sid="OwnGroupCapacity",
            actions=["autoscaling:SetDesiredCapacity",
                     "autoscaling:TerminateInstanceInAutoScalingGroup"],
            resources=[self.group_arn]))
        role.add_to_policy(iam.PolicyStatement(
            sid="RunLogGroupWrite",
            actions=["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"],
            # Log group actions are authorized against the group ARN, which AWS also
            # writes with a ":*" suffix. That suffix covers the streams as well.
            resources=[self._log_group_arn(), self._log_group_arn(":*")]))
        role.add_to_policy(iam.PolicyStatement(
            sid="RunTopicPublish", actions=["sns:Publish"],
            resources=[self.topic.topic_arn]))
        role.add_to_policy(iam.PolicyStatement(
            sid="SpotPriceRead", actions=["ec2:DescribeSpotPriceHistory"],
            # This read-only action supports no resource-level permissions.
            resources=["*"]))
        return role

    def _log_group_arn(self, suffix: str = "") -> str:
        return self.format_arn(service="logs", resource="log-group",
                               resource_name=self.log_group_name + suffix,
                               arn_format=ArnFormat.COLON_RESOURCE_NAME)

    def _grant_data_prefix_read(self, role: iam.Role) -> None:
        bucket_name, _, prefix = self.params.data_source[len("s3://"):].partition("/")
        prefix = prefix.rstrip("/")
        objects = f"{prefix}/*" if prefix else "*"
        role.add_to_policy(iam.PolicyStatement(
            sid="DataRead", actions=["s3:GetObject"],
            resources=[f"arn:{self.partition}:s3:::{bucket_name}/{objects}"]))
        role.add_to_policy(iam.PolicyStatement(
            sid="DataList", actions=["s3:ListBucket"],
            resources=[f"arn:{self.partition}:s3:::{bucket_name}"]))

    # Compute ----------------------------------------------------------------------

    def _run_config(self) -> RunConfig:
        params = self.params
        if self.data_asset is not None:
            data = {"data_zip_uri": self.data_asset.s3_object_url}
        else:
            data = {"data_prefix_uri": params.data_source}
        return RunConfig(
            run_id=params.run_name,
            region=self.region,
            bucket=self.bucket.bucket_name,
            group_name=self.group_name,
            train_command=list(params.train_command),
            checkpoint_every_steps=params.checkpoint_every_steps,
            keep_checkpoints=params.keep_checkpoints,
            poll_interval_seconds=params.poll_interval_seconds,
            max_crash_restarts=params.max_crash_restarts,
            max_restarts_without_progress=params.max_restarts_without_progress,
            heartbeat_timeout_seconds=params.heartbeat_timeout_seconds,
            lease_ttl_seconds=params.lease_ttl_seconds,
            max_runtime_seconds=params.max_runtime_seconds,
            nodes=params.nodes,
            min_nodes=params.effective_min_nodes,
            gpus_per_node=params.gpus_per_node,
            rendezvous_timeout_seconds=params.rendezvous_timeout_seconds,
            collective_timeout_seconds=params.collective_timeout_seconds,
            log_group=self.log_group.log_group_name,
            topic_arn=self.topic.topic_arn,
            **data,
        )

    def _security_group(self, vpc: ec2.IVpc) -> ec2.SecurityGroup:
        """Return the instances' security group: outbound only, plus TCP among the
        group's own instances when several train together (rendezvous, gloo, NCCL)."""
        multi_node = self.params.nodes > 1
        security_group = ec2.SecurityGroup(
            self, "InstanceSecurityGroup", vpc=vpc, allow_all_outbound=True,
            description=("spotrun training instances: inbound TCP from each other only"
                         if multi_node else "spotrun training instances: no inbound traffic"))
        if multi_node:
            security_group.add_ingress_rule(
                peer=security_group, connection=ec2.Port.all_tcp(),
                description="torchrun rendezvous and collectives between the run's instances")
        return security_group

    def _launch_template(self, security_group: ec2.SecurityGroup) -> ec2.LaunchTemplate:
        script = render_user_data(
            config_json=self.to_json_string(self._run_config().to_dict()),
            code_uri=self.code_asset.s3_object_url,
            region=self.region,
            python=self.params.python,
        )
        template = ec2.LaunchTemplate(
            self, "LaunchTemplate",
            machine_image=_machine_image(self.params.ami),
            user_data=ec2.UserData.custom(script),
            role=self.role,
            security_group=security_group,
            http_endpoint=True,
            http_tokens=ec2.LaunchTemplateHttpTokens.REQUIRED,
            # The supervisor runs on the host, not in a container: one hop is enough.
            http_put_response_hop_limit=1,
            instance_initiated_shutdown_behavior=ec2.InstanceInitiatedShutdownBehavior.TERMINATE,
            block_devices=[ec2.BlockDevice(
                device_name="/dev/xvda",
                volume=ec2.BlockDeviceVolume.ebs(
                    self.params.root_volume_gb, encrypted=True,
                    volume_type=ec2.EbsDeviceVolumeType.GP3, delete_on_termination=True))],
        )
        return template

    def _auto_scaling_group(self, vpc: ec2.IVpc,
                            launch_template: ec2.LaunchTemplate) -> autoscaling.AutoScalingGroup:
        if self.params.vpc_id:
            subnets = ec2.SubnetSelection(subnets=self.imported_subnets)
        else:
            subnets = ec2.SubnetSelection(subnet_type=ec2.SubnetType.PUBLIC)
        return autoscaling.AutoScalingGroup(
            self, "SpotGroup",
            auto_scaling_group_name=self.group_name,
            vpc=vpc,
            vpc_subnets=subnets,
            min_capacity=0,
            max_capacity=self.params.nodes,
            desired_capacity=self.params.nodes,
            # A replacement launched on a rebalance recommendation waits for the run
            # lease, so two instances never train the run at once.
            capacity_rebalance=self.params.capacity_rebalance,
            notifications=[autoscaling.NotificationConfiguration(topic=self.topic)],
            mixed_instances_policy=autoscaling.MixedInstancesPolicy(
                launch_template=launch_template,
                launch_template_overrides=[
                    autoscaling.LaunchTemplateOverrides(
                        instance_type=ec2.InstanceType(instance_type))
                    for instance_type in self.params.instance_types],
                instances_distribution=autoscaling.InstancesDistribution(
                    on_demand_base_capacity=0,
                    on_demand_percentage_above_base_capacity=0,
                    spot_allocation_strategy=autoscaling.SpotAllocationStrategy.PRICE_CAPACITY_OPTIMIZED),
            ),
        )


def _machine_image(ami: str) -> ec2.IMachineImage:
    if ami.startswith("/"):
        # EC2 resolves the public parameter at each launch, so a replacement instance
        # picks up the newest AMI without a redeploy.
        return ec2.MachineImage.resolve_ssm_parameter_at_launch(ami, os=ec2.OperatingSystemType.LINUX)
    return _FixedImage(ami)


@jsii.implements(ec2.IMachineImage)
class _FixedImage:
    """An AMI given by id, valid in whichever region the stack is deployed to."""

    def __init__(self, image_id: str) -> None:
        self._image_id = image_id

    def get_image(self, scope: Construct) -> ec2.MachineImageConfig:
        return ec2.MachineImageConfig(image_id=self._image_id,
                                      os_type=ec2.OperatingSystemType.LINUX,
                                      user_data=ec2.UserData.for_linux())
