"""The CloudFormation stack of one training run."""

from __future__ import annotations

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
from stacks.user_data import render_user_data

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# The code bundle is the repository filtered down to the instance-side packages.
CODE_BUNDLE_EXCLUDES = ["*", ".*", "!bootstrap", "!bootstrap/**", "!ml", "!ml/**",
                        "**/__pycache__", "**/*.pyc"]


class TrainingStack(Stack):
    """Bucket, instance role, launch template and spot Auto Scaling group of one run."""

    def __init__(self, scope: Construct, construct_id: str, *, params: RunParameters,
                 **kwargs) -> None:
        super().__init__(scope, construct_id, **kwargs)
        self.params = params
        self.group_name = f"spotrun-{params.run_name}"

        self.bucket = self._run_bucket()
        self.code_asset = s3_assets.Asset(self, "CodeBundle", path=str(PROJECT_ROOT),
                                          exclude=CODE_BUNDLE_EXCLUDES)
        self.data_asset = self._data_asset()
        self.log_group = logs.LogGroup(
            self, "Logs", log_group_name=f"/spotrun/{params.run_name}",
            removal_policy=RemovalPolicy.DESTROY)
        self.log_group.node.default_child.retention_in_days = params.log_retention_days
        self.topic = sns.Topic(self, "Notifications", enforce_ssl=True)

        vpc = self._network()
        self.role = self._instance_role()
        security_group = ec2.SecurityGroup(
            self, "InstanceSecurityGroup", vpc=vpc, allow_all_outbound=True,
            description="spotrun training instances: no inbound traffic")
        launch_template = self._launch_template(security_group)
        self.group = self._auto_scaling_group(vpc, launch_template)

        CfnOutput(self, "BucketName", value=self.bucket.bucket_name)
        CfnOutput(self, "GroupName", value=self.group_name)
        CfnOutput(self, "RunId", value=params.run_name)
        CfnOutput(self, "LogGroupName", value=self.log_group.log_group_name)
        CfnOutput(self, "TopicArn", value=self.topic.topic_arn)

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

    def _network(self) -> ec2.Vpc:
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

    # Permissions ------------------------------------------------------------------

    def _instance_role(self) -> iam.Role:
        role = iam.Role(
            self, "InstanceRole",
            assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
            description=f"spotrun run {self.params.run_name}: training instances")
        self.code_asset.grant_read(role)
        if self.data_asset is not None:
            self.data_asset.grant_read(role)
        else:
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
        group_arn = self.format_arn(
            service="autoscaling", resource="autoScalingGroup",
            resource_name=f"*:autoScalingGroupName/{self.group_name}",
            arn_format=ArnFormat.COLON_RESOURCE_NAME)
        role.add_to_policy(iam.PolicyStatement(
            sid="OwnGroupCapacity",
            actions=["autoscaling:SetDesiredCapacity",
                     "autoscaling:TerminateInstanceInAutoScalingGroup"],
            resources=[group_arn]))
        return role

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
            log_group=self.log_group.log_group_name,
            topic_arn=self.topic.topic_arn,
            **data,
        )

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

    def _auto_scaling_group(self, vpc: ec2.Vpc,
                            launch_template: ec2.LaunchTemplate) -> autoscaling.AutoScalingGroup:
        return autoscaling.AutoScalingGroup(
            self, "SpotGroup",
            auto_scaling_group_name=self.group_name,
            vpc=vpc,
            vpc_subnets=ec2.SubnetSelection(subnet_type=ec2.SubnetType.PUBLIC),
            min_capacity=0,
            max_capacity=1,
            desired_capacity=1,
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
