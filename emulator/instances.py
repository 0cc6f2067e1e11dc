"""The EC2 and Auto Scaling control plane of the local cloud.

moto keeps the group's records; this module does what EC2 and the group do beyond
records. It boots each in-service instance: an IMDS endpoint, plus the launch
template's user-data run by bash. It delivers the scenario's spot notices and faults,
and reclaims an instance when its notice expires. It turns an instance-initiated
shutdown into a termination and lets the group replace what was terminated.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

from emulator.cloud import LocalCloud
from emulator.imds import ImdsEmulator, InstanceDescription, RoleCredentials
from emulator.scenario import IMDS_FAULTS, Fault, Interruption, Scenario

log = logging.getLogger("spotrun.emulator")

TICK_S = 0.25
# Time an instance's processes get between the shutdown signal and the kill.
SHUTDOWN_GRACE_S = 15.0
LOOPBACK_ADDRESS = "127.0.0.1"


def _read_proc(pid: str, name: str) -> bytes:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def processes_with_env(name: str, value: str) -> list[int]:
    """Return the ids of processes whose environment sets ``name=value`` (Linux /proc)."""
    needle = f"{name}={value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and needle in _read_proc(entry, "environ").split(b"\0"):
            found.append(int(entry))
    return found


@dataclass
class EmulatedInstance:
    instance_id: str
    instance_type: str
    availability_zone: str
    root: Path
    imds: ImdsEmulator
    process: subprocess.Popen
    launched_at: float
    notice: Interruption | None = None
    notice_step: int | None = None
    reclaim_at: float | None = None
    shutdown_requested_at: float | None = None
    ended: bool = False

    @property
    def progress_path(self) -> Path:
        return self.root / "work" / "progress.jsonl"

    def current_step(self) -> int | None:
        """Return the newest step the trainer reported (read from the guest's disk)."""
        latest = self.latest_progress()
        return int(latest["step"]) if latest else None

    def latest_progress(self) -> dict | None:
        """Return the newest complete progress line of the trainer, or None."""
        try:
            with open(self.progress_path, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                size = handle.tell()
                handle.seek(max(0, size - 4096))
                lines = handle.read().splitlines()
        except OSError:
            return None
        for line in reversed(lines):
            try:
                record = json.loads(line)
                int(record["step"])
                return record
            except (ValueError, KeyError, TypeError):
                continue
        return None

    def signal_group(self, signal_number: int) -> None:
        """Signal every process of the instance, as an OS shutdown or power loss does.

        The trainer runs in a session of its own, so the user-data's process group is
        not enough: every process whose environment names this instance's root is hit.
        """
        try:
            os.killpg(self.process.pid, signal_number)
        except ProcessLookupError:
            pass
        for pid in processes_with_env("SPOTRUN_ROOT", str(self.root)):
            _signal(pid, signal_number)

    def trainer_pids(self) -> list[int]:
        return processes_with_env("SPOTRUN_PROGRESS_FILE", str(self.progress_path))

    def supervisor_pids(self) -> list[int]:
        return [pid for pid in processes_with_env("SPOTRUN_ROOT", str(self.root))
                if b"bootstrap" in _read_proc(str(pid), "cmdline").split(b"\0")]

    def role(self) -> str | None:
        """Return "leader" or "member" as the supervisor wrote it, or None before that."""
        try:
            return (self.root / "work" / "role").read_text(encoding="utf-8").strip()
        except OSError:
            return None

    def matches(self, target: str) -> bool:
        return target == "any" or self.role() == target

    def progress_size(self) -> int:
        try:
            return self.progress_path.stat().st_size
        except OSError:
            return 0


def _signal(pid: int, signal_number: int) -> None:
    try:
        os.kill(pid, signal_number)
    except ProcessLookupError:
        pass


@dataclass
class FaultState:
    """A scenario fault and what the control plane has done with it."""

    fault: Fault
    fired: bool = False
    # For repeated trainer faults: the progress file size at the last hit, so the next
    # hit waits for the restarted trainer to report new steps.
    progress_size_at_hit: int = -1


@dataclass
class Observation:
    """Record of the control plane's actions and observations, for the report."""

    instances: list[dict] = field(default_factory=list)
    notices_sent: list[dict] = field(default_factory=list)
    faults_injected: list[dict] = field(default_factory=list)
    timed_out: bool = False


class ControlPlane:
    def __init__(self, cloud: LocalCloud, group_name: str, scenario: Scenario,
                 work_dir: Path, say: Callable[[str], None]) -> None:
        self.cloud = cloud
        self.group_name = group_name
        self.scenario = scenario
        self.work_dir = work_dir
        self.say = say
        self.autoscaling = cloud.client("autoscaling")
        self.ec2 = cloud.client("ec2")
        self.iam = cloud.client("iam")
        self.sts = cloud.ec2_service_client("sts")
        self.instances: dict[str, EmulatedInstance] = {}
        self.pending = list(scenario.interruptions)
        self.faults = [FaultState(fault) for fault in scenario.faults]
        self.observation = Observation()
        self.template_ref: dict | None = None
        self.instance_types: list[str] = []

    # Main loop -----------------------------------------------------------------------

    def run(self, on_tick: Callable[[], None] | None = None) -> Observation:
        """Run until the group is at zero with no instance left, or the timeout."""
        deadline = time.monotonic() + self.scenario.timeout_seconds
        if self.scenario.revoke_actions:
            self._revoke_role_actions(self.scenario.revoke_actions)
        while True:
            group = self._describe_group()
            self._boot_new_instances(group)
            self._handle_exited_processes(group)
            self._deliver_notices()
            self._inject_faults()
            self._reclaim_expired()
            self._stop_removed_instances(group)
            if on_tick is not None:
                on_tick()
            live = [item for item in self.instances.values() if not item.ended]
            if group["DesiredCapacity"] == 0 and not live:
                return self.observation
            if time.monotonic() > deadline:
                self.say(f"timeout: the run did not end within "
                         f"{self.scenario.timeout_seconds:.0f} s; setting capacity to 0")
                self.observation.timed_out = True
                self.autoscaling.set_desired_capacity(
                    AutoScalingGroupName=self.group_name, DesiredCapacity=0)
                self.shutdown_all()
                return self.observation
            time.sleep(TICK_S)

    def shutdown_all(self) -> None:
        for instance in self.instances.values():
            if not instance.ended:
                instance.signal_group(signal.SIGKILL)
                instance.process.wait()
                self._end(instance)

    # Group ---------------------------------------------------------------------------

    def _describe_group(self) -> dict:
        groups = self.autoscaling.describe_auto_scaling_groups(
            AutoScalingGroupNames=[self.group_name])["AutoScalingGroups"]
        if not groups:
            raise RuntimeError(f"Auto Scaling group {self.group_name} not found")
        return groups[0]

    def _boot_new_instances(self, group: dict) -> None:
        policy = group["MixedInstancesPolicy"]["LaunchTemplate"]
        self.template_ref = policy["LaunchTemplateSpecification"]
        self.instance_types = [item["InstanceType"] for item in policy.get("Overrides", [])]
        for member in group["Instances"]:
            instance_id = member["InstanceId"]
            if member["LifecycleState"] == "InService" and instance_id not in self.instances:
                self._boot(instance_id)

    def _launch_duplicate(self) -> str:
        """Start an instance of the group's launch template outside the group."""
        reservation = self.ec2.run_instances(
            LaunchTemplate={"LaunchTemplateId": self.template_ref["LaunchTemplateId"],
                            "Version": str(self.template_ref.get("Version", "$Latest"))},
            MinCount=1, MaxCount=1)
        instance_id = reservation["Instances"][0]["InstanceId"]
        self._boot(instance_id)
        return instance_id

    def _boot(self, instance_id: str) -> None:
        template_ref = self.template_ref
        versions = self.ec2.describe_launch_template_versions(
            LaunchTemplateId=template_ref["LaunchTemplateId"],
            Versions=[str(template_ref.get("Version", "$Latest"))])
        template = versions["LaunchTemplateVersions"][0]["LaunchTemplateData"]
        user_data = base64.b64decode(template["UserData"])
        role_name = self._role_of_profile(template["IamInstanceProfile"]["Arn"])
        reservation = self.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]
        ec2_instance = reservation["Instances"][0]
        # Price-capacity-optimized capacity here is always the first type listed.
        instance_type = self.instance_types[0] if self.instance_types else "m5.large"
        description = InstanceDescription(
            instance_id=instance_id, instance_type=instance_type,
            ami_id=ec2_instance.get("ImageId", "ami-00000000"),
            availability_zone=ec2_instance["Placement"]["AvailabilityZone"],
            region=self.cloud.region,
            # The emulated instances share this machine's loopback interface, where
            # multi-node runs find each other.
            private_ip=LOOPBACK_ADDRESS,
            role_name=role_name, user_data=user_data, account_id=self.cloud.account_id)
        role_arn = f"arn:aws:iam::{self.cloud.account_id}:role/{role_name}"
        imds = ImdsEmulator(description, credentials_source=lambda: RoleCredentials.from_sts(
            self.sts.assume_role(RoleArn=role_arn, RoleSessionName=instance_id,
                                 DurationSeconds=3600)["Credentials"]))
        imds_url = imds.start()

        root = self.work_dir / "instances" / instance_id
        root.mkdir(parents=True, exist_ok=True)
        script = root / "user-data"
        script.write_bytes(user_data)
        console = open(root / "console.log", "wb")
        process = subprocess.Popen(
            ["bash", str(script)], cwd=root, env=self._instance_env(root, imds_url),
            stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.instances[instance_id] = EmulatedInstance(
            instance_id=instance_id, instance_type=instance_type,
            availability_zone=description.availability_zone, root=root, imds=imds,
            process=process, launched_at=time.time())
        self.observation.instances.append({
            "instance_id": instance_id, "instance_type": instance_type,
            "availability_zone": description.availability_zone, "launched_at": time.time()})
        self.say(f"instance {instance_id} started ({instance_type}, "
                 f"{description.availability_zone}); console log {root / 'console.log'}")
        self._on_boot(self.instances[instance_id])

    def _on_boot(self, instance: EmulatedInstance) -> None:
        """Deliver what the scenario sends to an instance as soon as it boots."""
        if self.pending and self.pending[0].on_boot:
            self._send_notice(instance, self.pending.pop(0), step=None)
        for state in self.faults:
            if state.fault.on_boot and not state.fired:
                self._fire(state, instance)

    def _revoke_role_actions(self, actions: tuple[str, ...]) -> None:
        """Remove IAM actions from the instance role's inline policies (before any boot)."""
        group = self._describe_group()
        template_ref = group["MixedInstancesPolicy"]["LaunchTemplate"][
            "LaunchTemplateSpecification"]
        versions = self.ec2.describe_launch_template_versions(
            LaunchTemplateId=template_ref["LaunchTemplateId"],
            Versions=[str(template_ref.get("Version", "$Latest"))])
        template = versions["LaunchTemplateVersions"][0]["LaunchTemplateData"]
        role_name = self._role_of_profile(template["IamInstanceProfile"]["Arn"])
        revoked = {action.lower() for action in actions}
        removed = 0
        for policy_name in self.iam.list_role_policies(RoleName=role_name)["PolicyNames"]:
            document = self.iam.get_role_policy(RoleName=role_name,
                                                PolicyName=policy_name)["PolicyDocument"]
            if isinstance(document, str):
                document = json.loads(document)
            statements = document["Statement"]
            statements = statements if isinstance(statements, list) else [statements]
            remaining_statements = []
            for statement in statements:
                granted = statement.get("Action", [])
                granted = [granted] if isinstance(granted, str) else granted
                remaining = [action for action in granted if action.lower() not in revoked]
                removed += len(granted) - len(remaining)
                if remaining:
                    remaining_statements.append({**statement, "Action": remaining})
            document["Statement"] = remaining_statements
            self.iam.put_role_policy(RoleName=role_name, PolicyName=policy_name,
                                     PolicyDocument=json.dumps(document))
        if removed == 0:
            raise RuntimeError(f"no inline policy of role {role_name} grants any of "
                               f"{', '.join(actions)}; nothing to revoke")
        self.say(f"revoked {', '.join(actions)} from role {role_name} "
                 f"({removed} grant(s) removed)")

    def _nodes(self) -> int:
        nodes = self.scenario.params.get("nodes", 1)
        return nodes if isinstance(nodes, int) else 1

    def _role_of_profile(self, profile_arn: str) -> str:
        profile_name = profile_arn.rsplit("/", 1)[-1]
        profile = self.iam.get_instance_profile(InstanceProfileName=profile_name)
        return profile["InstanceProfile"]["Roles"][0]["RoleName"]

    def _instance_env(self, root: Path, imds_url: str) -> dict[str, str]:
        """Environment of the emulated instance: the same user-data, pointed at this cloud.

        No AWS keys are passed: botocore finds the role credentials through IMDS, as on
        EC2. Empty config files keep a developer's own AWS profile out.
        """
        (root / "aws-config").touch()
        bin_dir = str(Path(sys.executable).parent)
        return {
            "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(root),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds_url,
            "AWS_ENDPOINT_URL": self.cloud.endpoint,
            "AWS_CONFIG_FILE": str(root / "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(root / "aws-config"),
            "SPOTRUN_ROOT": str(root),
            "SPOTRUN_PYTHON": sys.executable,
            # The script's last line powers off; here the control plane detects the exit.
            "SPOTRUN_SHUTDOWN_COMMAND": "true",
            # Emulated instances share this machine's cores; one thread per training
            # process keeps several of them from oversubscribing the cores.
            **({"OMP_NUM_THREADS": "1"} if self._nodes() > 1 else {}),
        }

    # Lifecycle ---------------------------------------------------------------------

    def _handle_exited_processes(self, group: dict) -> None:
        """Terminate instances whose user-data exited: they powered themselves off."""
        members = {member["InstanceId"] for member in group["Instances"]}
        for instance in self.instances.values():
            if instance.ended or instance.process.poll() is None:
                continue
            self.say(f"instance {instance.instance_id} shut down "
                     f"(user-data exit code {instance.process.returncode})")
            # Powering off ends whatever the user-data left behind.
            instance.signal_group(signal.SIGKILL)
            self._terminate_in_group(instance, members)
            self._end(instance)

    def _terminate_in_group(self, instance: EmulatedInstance, members: set[str]) -> None:
        """Terminate an instance; the group launches a replacement while desired > 0."""
        if instance.instance_id in members:
            self.autoscaling.terminate_instance_in_auto_scaling_group(
                InstanceId=instance.instance_id, ShouldDecrementDesiredCapacity=False)
        else:
            self.ec2.terminate_instances(InstanceIds=[instance.instance_id])

    def _end(self, instance: EmulatedInstance) -> None:
        instance.imds.stop()
        instance.ended = True
        for record in self.observation.instances:
            if record["instance_id"] == instance.instance_id:
                record["ended_at"] = time.time()
                record["exit_code"] = instance.process.returncode

    def _stop_removed_instances(self, group: dict) -> None:
        """Shut down instances the group terminated (capacity set to 0, for example)."""
        members = {member["InstanceId"] for member in group["Instances"]}
        for instance in self.instances.values():
            if instance.ended or instance.instance_id in members:
                continue
            now = time.monotonic()
            if instance.shutdown_requested_at is None:
                instance.shutdown_requested_at = now
                instance.signal_group(signal.SIGTERM)
            elif now - instance.shutdown_requested_at > SHUTDOWN_GRACE_S:
                instance.signal_group(signal.SIGKILL)
                instance.process.wait()
                self.say(f"instance {instance.instance_id} terminated by the group")
                self._end(instance)

    # Spot interruptions ---------------------------------------------------------------

    def _deliver_notices(self) -> None:
        if not self.pending:
            return
        interruption = self.pending[0]
        if interruption.on_boot:
            return
        for instance in self.instances.values():
            if instance.ended or instance.notice is not None:
                continue
            step = instance.current_step()
            if step is None or step < interruption.after_step:
                continue
            if not instance.matches(interruption.target):
                continue
            self.pending.pop(0)
            self._send_notice(instance, interruption, step)
            return

    def _send_notice(self, instance: EmulatedInstance, interruption: Interruption,
                     step: int | None) -> None:
        reclaim_at = datetime.now(timezone.utc) + timedelta(
            seconds=interruption.notice_seconds)
        instance.imds.publish_instance_action(interruption.action, reclaim_at)
        instance.notice = interruption
        instance.notice_step = step
        instance.reclaim_at = time.monotonic() + interruption.notice_seconds
        self.observation.notices_sent.append({
            "instance_id": instance.instance_id, "step": step,
            "action": interruption.action,
            "notice_seconds": interruption.notice_seconds, "sent_at": time.time()})
        when = "at boot" if step is None else f"at step {step}"
        self.say(f"spot {interruption.action} notice sent to {instance.instance_id} "
                 f"{when}; reclaimed in {interruption.notice_seconds:g} s")

    # Faults ----------------------------------------------------------------------------

    def _inject_faults(self) -> None:
        for state in self.faults:
            if state.fault.on_boot or (state.fired and not state.fault.repeat):
                continue
            for instance in list(self.instances.values()):
                if instance.ended:
                    continue
                step = instance.current_step()
                if step is None or step < state.fault.after_step:
                    continue
                if not instance.matches(state.fault.target):
                    continue
                if state.fault.repeat and instance.progress_size() <= state.progress_size_at_hit:
                    continue
                if self._fire(state, instance):
                    break

    def _fire(self, state: FaultState, instance: EmulatedInstance) -> bool:
        """Inject one fault into an instance; return False when it could not act yet."""
        fault = state.fault
        if fault.kind in IMDS_FAULTS:
            instance.imds.inject_fault(IMDS_FAULTS[fault.kind], fault.duration_seconds,
                                       delay_s=fault.delay_seconds)
        elif fault.kind == "rebalance":
            instance.imds.publish_rebalance_recommendation()
        elif fault.kind in ("trainer-crash", "trainer-hang"):
            pids = instance.trainer_pids()
            if not pids:
                return False
            signal_number = signal.SIGKILL if fault.kind == "trainer-crash" else signal.SIGSTOP
            for pid in pids:
                _signal(pid, signal_number)
            state.progress_size_at_hit = instance.progress_size()
        elif fault.kind == "supervisor-kill":
            pids = instance.supervisor_pids()
            if not pids:
                return False
            for pid in pids:
                _signal(pid, signal.SIGKILL)
        elif fault.kind == "instance-kill":
            instance.signal_group(signal.SIGKILL)
            instance.process.wait()
            members = {member["InstanceId"] for member in self._describe_group()["Instances"]}
            self._terminate_in_group(instance, members)
            self._end(instance)
        elif fault.kind == "duplicate-instance":
            duplicate = self._launch_duplicate()
            self.say(f"duplicate instance {duplicate} of the same run started")
        state.fired = True
        step = instance.current_step()
        self.observation.faults_injected.append({
            "kind": fault.kind, "instance_id": instance.instance_id, "step": step,
            "at": time.time()})
        self.say(f"fault {fault.kind} injected into {instance.instance_id} at step {step}")
        return True

    def _reclaim_expired(self) -> None:
        members = None
        for instance in self.instances.values():
            if instance.ended or instance.reclaim_at is None:
                continue
            if time.monotonic() < instance.reclaim_at:
                continue
            instance.signal_group(signal.SIGKILL)
            instance.process.wait()
            self.say(f"instance {instance.instance_id} reclaimed by EC2 (notice expired)")
            if members is None:
                members = {member["InstanceId"]
                           for member in self._describe_group()["Instances"]}
            self._terminate_in_group(instance, members)
            self._end(instance)
