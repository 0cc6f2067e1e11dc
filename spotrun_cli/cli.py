"""The `spotrun` command line: status, logs, report, download and drill of a run."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from spotrun_cli import drill, logs, run
from spotrun_cli.aws import EXIT_FAILED, EXIT_USAGE, Aws, CliError, describe_aws_error
from spotrun_cli.cost import PriceTable, estimate_costs
from spotrun_cli.summary import build_summary, format_status
from spotrun_cli.timeline import instance_spans

EXIT_OK = 0
EXIT_INTERRUPTED = 130
LOCAL_NO_SPOT = "local cloud: no spot price history"

DESCRIPTION = """\
Watch and fetch spotrun training runs. A run is found by name: from the outputs of the
stack Spotrun-RUN while it exists, else in the bucket given with --bucket (the run
bucket is kept after `cdk destroy`). Credentials, region and endpoint come from the
usual AWS environment (AWS_PROFILE, AWS_ACCESS_KEY_ID, AWS_REGION, AWS_ENDPOINT_URL);
an endpoint on localhost is treated as the local cloud."""

EPILOG = """\
exit codes: 0 success; 1 an AWS request failed or the run has no such data yet;
2 invalid arguments, unknown run, missing credentials or unreachable endpoint."""


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--bucket", help="run bucket, for a run whose stack was destroyed "
                                         "(overrides the stack's BucketName output)")
    common.add_argument("--region", help="AWS region (default: AWS_REGION or the profile's)")
    common.add_argument("--profile", help="AWS profile (default: AWS_PROFILE)")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spotrun", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common_options()

    status = commands.add_parser(
        "status", parents=[common], help="state, progress, counts and cost so far",
        description="Show the run's state, step, loss, committed checkpoint, instance, "
                    "interruptions, crashes, run time and cost (spot vs on-demand).")
    status.add_argument("run", metavar="RUN", help="run name (run_name in cdk.json)")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument("--prices", type=Path,
                        help="on-demand price table, JSON (default: prices.json of the "
                             "spotrun_cli package)")

    logs_parser = commands.add_parser(
        "logs", parents=[common], help="print the run's CloudWatch Logs",
        description="Print the events of the run's log group (the stack output "
                    "LogGroupName, /spotrun/RUN), oldest first.")
    logs_parser.add_argument("run", metavar="RUN", help="run name")
    logs_parser.add_argument("--follow", "-f", action="store_true",
                             help="keep polling for new events until Ctrl-C")
    logs_parser.add_argument("--since", type=float, metavar="MINUTES",
                             help="only events of the last MINUTES minutes (default: all)")
    logs_parser.add_argument("--interval", type=float, default=2.0, metavar="SECONDS",
                             help="seconds between polls with --follow (default: 2)")

    report = commands.add_parser(
        "report", parents=[common], help="write an HTML report with charts",
        description="Write index.html, loss.png and timeline.png: the loss curve with "
                    "spot notices and resumes, a timeline of instances and checkpoints, "
                    "and the cost table.")
    report.add_argument("run", metavar="RUN", help="run name")
    report.add_argument("--out", type=Path, metavar="DIR",
                        help="output folder (default: ./spotrun-report-RUN)")
    report.add_argument("--link-images", action="store_true",
                        help="reference the PNG files by relative path instead of embedding "
                             "them in index.html as data URIs")
    report.add_argument("--prices", type=Path, help="on-demand price table, JSON")

    download = commands.add_parser(
        "download", parents=[common], help="download the final model and metrics",
        description="Download everything under runs/RUN/output/ (model.pt, metrics.json).")
    download.add_argument("run", metavar="RUN", help="run name")
    download.add_argument("--out", type=Path, metavar="DIR",
                          help="output folder (default: ./spotrun-output-RUN)")

    drill_parser = commands.add_parser(
        "drill", parents=[common], help="trigger a spot interruption drill",
        description="On AWS, start the AWS FIS experiment template tagged spotrun:run=RUN. "
                    "On the local cloud, print how to run a drill scenario instead.")
    drill_parser.add_argument("run", metavar="RUN", help="run name")
    return parser


# Commands -----------------------------------------------------------------------------


def _summary(aws: Aws, args: argparse.Namespace) -> dict:
    location = run.locate_run(aws, args.run, args.bucket)
    data = run.read_run(aws.client("s3"), location, with_progress=False)
    now = time.time()
    spans = instance_spans(data.events, data.status, now)
    local = aws.is_local_cloud()
    costs = estimate_costs(spans, aws.region, PriceTable(args.prices),
                           ec2=None if local else aws.client("ec2"),
                           no_spot_reason=LOCAL_NO_SPOT)
    return build_summary(data, costs, now)


def command_status(aws: Aws, args: argparse.Namespace) -> int:
    summary = _summary(aws, args)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        print(format_status(summary))
    return EXIT_OK


def command_logs(aws: Aws, args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise CliError(f"invalid --interval {args.interval}: expected seconds > 0")
    location = run.locate_run(aws, args.run, args.bucket)
    start_ms = None
    if args.since is not None:
        start_ms = int((time.time() - args.since * 60) * 1000)
    logs.print_logs(aws.client("logs"), location.log_group, start_ms=start_ms,
                    follow=args.follow, interval_s=args.interval,
                    write=lambda line: print(line, flush=True),
                    note=lambda line: print(line, file=sys.stderr, flush=True))
    return EXIT_OK


def command_report(aws: Aws, args: argparse.Namespace) -> int:
    from spotrun_cli.report import write_html_report

    location = run.locate_run(aws, args.run, args.bucket)
    local = aws.is_local_cloud()
    page = write_html_report(
        aws.client("s3"), location.bucket, location.run_id,
        args.out or Path(f"spotrun-report-{args.run}"),
        ec2=None if local else aws.client("ec2"), region=aws.region,
        prices=PriceTable(args.prices), embed_images=not args.link_images,
        log_group=location.log_group, stack_name=location.stack_name,
        no_spot_reason=LOCAL_NO_SPOT)
    print(f"report written to {page}")
    return EXIT_OK


def command_download(aws: Aws, args: argparse.Namespace) -> int:
    location = run.locate_run(aws, args.run, args.bucket)
    s3 = aws.client("s3")
    prefix = location.prefix + "output/"
    keys = run.list_keys(s3, location.bucket, prefix)
    if not keys:
        status = run.get_json(s3, location.bucket, location.prefix + "status.json") or {}
        raise CliError(f"run {args.run} has no output yet (state: "
                       f"{status.get('state', 'not started')}); the model and metrics "
                       f"are uploaded when training completes", EXIT_FAILED)
    out_dir = args.out or Path(f"spotrun-output-{args.run}")
    for key in keys:
        relative = key[len(prefix):]
        target = (out_dir / relative).resolve()
        if out_dir.resolve() not in target.parents:
            raise CliError(f"invalid output key s3://{location.bucket}/{key}: it would be "
                           f"written outside {out_dir}", EXIT_FAILED)
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(location.bucket, key, str(target))
        print(f"{out_dir / relative}  ({target.stat().st_size} bytes)")
    return EXIT_OK


def command_drill(aws: Aws, args: argparse.Namespace) -> int:
    run.validate_run_name(args.run)
    if aws.is_local_cloud():
        print(drill.local_cloud_help(args.run), file=sys.stderr)
        return EXIT_USAGE
    experiment = drill.start_drill(aws.client("fis"), args.run)
    print(f"started AWS FIS experiment {experiment.get('id')} from template "
          f"{experiment.get('experimentTemplateId')} (state "
          f"{experiment.get('state', {}).get('status')}); watch it with "
          f"`spotrun status {args.run}`")
    return EXIT_OK


COMMANDS = {"status": command_status, "logs": command_logs, "report": command_report,
            "download": command_download, "drill": command_drill}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        aws = Aws(profile=args.profile, region=args.region)
        return COMMANDS[args.command](aws, args)
    except CliError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - AWS errors become one line, others re-raise
        described = describe_aws_error(error)
        if described is None:
            raise
        print(f"error: {described}", file=sys.stderr)
        return described.exit_code
