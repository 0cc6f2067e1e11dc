"""Run one training run through its whole life on the local cloud.

    python -m emulator run [--scenario FILE] [--report FILE] [--work-dir DIR]

Starts a moto server, runs the real ``cdk bootstrap`` and ``cdk deploy`` against it,
plays EC2 and the Auto Scaling group (instances, IMDS, spot notices, replacements) until
the group is at zero, writes the JSON report, and runs ``cdk destroy``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from botocore.exceptions import ClientError

from emulator.cloud import CloudError, LocalCloud
from emulator.instances import ControlPlane
from emulator.report import build_report, final_weights_sha256, read_run
from emulator.scenario import Scenario, ScenarioError, load_scenario
from spotrun_cli import write_html_report
from stacks.config import ParameterError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXIT_FAILED = 1
EXIT_USAGE = 2
# Events worth a line on the console while the run goes on.
EVENT_LINES = {
    "instance_started": lambda e: (
        f"supervisor on {e['instance_id']} joined as a member (another instance holds "
        f"the run lease)" if e.get("role") == "member" else
        f"supervisor on {e['instance_id']} holds the run lease "
        f"(generation {e.get('lease_generation')})"),
    "round_started": lambda e: f"round {e.get('round')}: {len(e.get('members', [])) + 1} "
                               f"instance(s) resume from step {e.get('resume_step')}",
    "round_ended": lambda e: f"round {e.get('round')} ended with exit code "
                             f"{e.get('exit_code')}; committed step {e.get('committed_step')}",
    "resumed": lambda e: f"resumed from checkpoint step {e.get('step')} on {e['instance_id']}",
    "checkpoint_committed": lambda e: f"checkpoint step {e.get('step')} committed to S3",
    "interruption_notice": lambda e: f"supervisor saw the {e.get('action')} notice at step "
                                     f"{e.get('step_at_notice')}",
    "interruption_checkpoint": lambda e: f"interruption checkpoint: step "
                                         f"{e.get('checkpoint_step')}, steps lost "
                                         f"{e.get('steps_lost')}",
    "rebalance_recommendation": lambda e: f"rebalance recommendation at step {e.get('step')}",
    "trainer_crash": lambda e: f"trainer crashed with exit code {e.get('exit_code')}",
    "completed": lambda e: f"training completed at step {e.get('step')}; DONE written",
    "failed": lambda e: f"run failed: {e.get('reason')}",
    "stopped": lambda e: f"run stopped: {e.get('reason')}",
    "bootstrap_crash": lambda e: f"supervisor crashed: {e.get('reason')}",
    "previous_instance_lost": lambda e: f"previous instance {e.get('previous_instance_id')}"
                                        f" died without releasing the lease",
}


class Console:
    """Phase lines with the time since the start of the run."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {message}", flush=True)


class RunWatcher:
    """Print new run events and the training progress while the control plane runs."""

    def __init__(self, console: Console, s3, bucket: str, run_id: str,
                 control: ControlPlane) -> None:
        self.console = console
        self.s3 = s3
        self.bucket = bucket
        self.prefix = f"runs/{run_id}/events/"
        self.control = control
        self.seen: set[str] = set()
        self.last_check = 0.0
        self.last_step: int | None = None

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self.last_check < 1.0:
            return
        self.last_check = now
        response = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix)
        for item in response.get("Contents", []):
            if item["Key"] in self.seen:
                continue
            self.seen.add(item["Key"])
            event = json.loads(self.s3.get_object(Bucket=self.bucket,
                                                  Key=item["Key"])["Body"].read())
            describe = EVENT_LINES.get(event["type"])
            if describe is not None:
                self.console.say(describe(event))
        self._print_progress()

    def _print_progress(self) -> None:
        for instance in self.control.instances.values():
            if instance.ended:
                continue
            latest = instance.latest_progress()
            if latest is None:
                continue
            step = int(latest["step"])
            if self.last_step is None or step >= self.last_step + 25 or step < self.last_step:
                self.last_step = step
                self.console.say(f"training on {instance.instance_id}: "
                                 f"{progress_bar(step, latest.get('total_steps'))} "
                                 f"loss {_format_loss(latest.get('loss'))}")


def progress_bar(step: int, total: object, width: int = 24) -> str:
    """Return ``step N/T [#####-----] P%``, or ``step N`` when the total is unknown."""
    if not isinstance(total, int) or total <= 0:
        return f"step {step}"
    filled = min(width, round(width * step / total))
    return f"step {step}/{total} [{'#' * filled}{'-' * (width - filled)}] " \
           f"{100 * step / total:3.0f}%"


def _format_loss(loss: object) -> str:
    return f"{loss:.4f}" if isinstance(loss, (int, float)) else "n/a"


def run(scenario: Scenario, report_path: Path, work_dir: Path) -> int:
    """Start a local cloud, run the scenario on it, stop the cloud; return the exit code."""
    console = Console()
    cloud = LocalCloud(work_dir / "cloud", PROJECT_ROOT)
    try:
        start_cloud(cloud, console)
        report = run_on_cloud(cloud, scenario, work_dir, console)
    finally:
        cloud.stop()
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    _print_summary(console, report, report_path)
    return 0 if report["status"] == "completed" else EXIT_FAILED


def start_cloud(cloud: LocalCloud, console: Console) -> None:
    """Start the moto server and bootstrap the CDK environment in it."""
    cloud.start()
    console.say(f"local cloud: moto server at {cloud.endpoint} (IAM enforced)")
    cloud.cdk(["bootstrap", f"aws://{cloud.account_id}/{cloud.region}"],
              log_name="cdk-bootstrap")
    console.say("cdk bootstrap: done")


def run_on_cloud(cloud: LocalCloud, scenario: Scenario, work_dir: Path,
                 console: Console) -> dict:
    """Deploy, run and destroy one run on a started cloud; return the report."""
    cdk_context = json.loads((PROJECT_ROOT / "cdk.json").read_text())["context"]
    params = scenario.run_parameters(cdk_context)
    console.say(f"scenario: {scenario.description or 'unnamed'}; run {params.run_name}")
    started = time.monotonic()
    stack_name = f"Spotrun-{params.run_name}"
    cloud.remove_cdk_output()
    # moto 5.2 leaves stack outputs empty after a change set, so the local cloud
    # deploys with CreateStack. On AWS `cdk deploy` uses a change set as usual.
    cloud.cdk(["deploy", stack_name, "--require-approval", "never", "--method", "direct"],
              context=scenario.context_overrides(), log_name=f"cdk-deploy-{params.run_name}")
    outputs = _stack_outputs(cloud, stack_name)
    console.say(f"cdk deploy: stack {stack_name} created; bucket {outputs['BucketName']},"
                f" group {outputs['GroupName']}")

    control = ControlPlane(cloud, outputs["GroupName"], scenario,
                           work_dir / params.run_name, console.say)
    try:
        s3 = cloud.client("s3")
        watcher = RunWatcher(console, s3, outputs["BucketName"], params.run_name, control)
        observation = control.run(on_tick=watcher)
        watcher.last_check = 0.0
        watcher()
    finally:
        control.shutdown_all()

    group = control._describe_group()
    running = _running_instances(cloud)
    run_data = read_run(s3, outputs["BucketName"], params.run_name)
    weights = final_weights_sha256(s3, outputs["BucketName"], params.run_name)
    console.say(f"group at desired capacity {group['DesiredCapacity']}, "
                f"{running} instance(s) running")
    html_report = write_html_report(
        s3, outputs["BucketName"], params.run_name, work_dir / params.run_name / "report",
        log_group=outputs.get("LogGroupName"), stack_name=stack_name,
        no_spot_reason="local cloud: no spot price history")
    console.say(f"HTML report: {html_report}")

    cloud.cdk(["destroy", stack_name, "--force"], context=scenario.context_overrides(),
              log_name=f"cdk-destroy-{params.run_name}")
    deleted = _stack_deleted(cloud, stack_name)
    console.say(f"cdk destroy: stack {'deleted' if deleted else 'NOT deleted'}"
                f"{'; run bucket kept' if params.keep_bucket else ''}")
    report = build_report(run=run_data, observation=observation, weights_sha256=weights,
                          desired_capacity=group["DesiredCapacity"],
                          running_instances=running, stack_deleted=deleted,
                          duration_s=time.monotonic() - started,
                          scenario_description=scenario.description)
    report["html_report"] = str(html_report)
    report["run_name"] = params.run_name
    report["bucket"] = outputs["BucketName"]
    return report


def _stack_outputs(cloud: LocalCloud, stack_name: str) -> dict[str, str]:
    stack = cloud.client("cloudformation").describe_stacks(StackName=stack_name)["Stacks"][0]
    outputs = {item["OutputKey"]: item["OutputValue"] for item in stack.get("Outputs", [])}
    missing = {"BucketName", "GroupName"} - set(outputs)
    if missing:
        raise CloudError(f"stack {stack_name} has no output {sorted(missing)[0]}; "
                         f"outputs: {outputs}")
    return outputs


def _running_instances(cloud: LocalCloud) -> int:
    reservations = cloud.client("ec2").describe_instances(
        Filters=[{"Name": "instance-state-name", "Values": ["pending", "running"]}])
    return sum(len(reservation["Instances"]) for reservation in reservations["Reservations"])


def _stack_deleted(cloud: LocalCloud, stack_name: str) -> bool:
    try:
        stacks = cloud.client("cloudformation").describe_stacks(StackName=stack_name)["Stacks"]
    except ClientError as error:
        if "does not exist" in str(error):
            return True
        raise
    return all(stack["StackStatus"] == "DELETE_COMPLETE" for stack in stacks)


def _print_summary(console: Console, report: dict, report_path: Path) -> None:
    console.say(f"run {report['status']}: {report['instances_launched']} instance(s), "
                f"{len(report['interruptions'])} interruption(s), final step "
                f"{report['final_step']}, final loss {report['final_loss']}, "
                f"validation accuracy {report['val_accuracy']}")
    for item in report["interruptions"]:
        console.say(f"  interruption at step {item['step_at_notice']}: checkpoint step "
                    f"{item['checkpoint_step']}, steps lost {item['steps_lost']}, resumed "
                    f"from {item['resumed_from']}")
    console.say(f"HTML report with charts: {report['html_report']}")
    console.say(f"report: {report_path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emulator",
                                     description="spotrun's local cloud")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="deploy, train, interrupt, finish, destroy")
    run_parser.add_argument("--scenario", type=Path, default=None,
                            help="scenario JSON file (default: no interruptions)")
    run_parser.add_argument("--report", type=Path, default=Path("report.json"),
                            help="where to write the JSON report (default: report.json)")
    run_parser.add_argument("--work-dir", type=Path, default=None,
                            help="folder for logs and instance disks (default: a new "
                                 "temporary folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    try:
        scenario = load_scenario(args.scenario)
        cdk_context = json.loads((PROJECT_ROOT / "cdk.json").read_text())["context"]
        scenario.run_parameters(cdk_context)
    except (ScenarioError, ParameterError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="spotrun-local-"))
    try:
        return run(scenario, args.report.resolve(), work_dir.resolve())
    except CloudError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
