"""Entry point on the instance: ``python -m bootstrap --config run-config.json``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from bootstrap.config import ConfigError, RunConfig
from bootstrap.imds import ImdsClient, ImdsUnavailableError
from bootstrap.supervisor import Supervisor, record_bootstrap_crash

EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bootstrap",
                                     description="spotrun supervisor for one instance")
    parser.add_argument("--config", type=Path, required=True,
                        help="run configuration JSON written by the instance user-data")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="folder for data, checkpoints and logs "
                             "(default: 'work' beside the configuration file)")
    args = parser.parse_args(argv)
    work_dir = args.work_dir or args.config.resolve().parent / "work"
    work_dir.mkdir(parents=True, exist_ok=True)
    _configure_logging(work_dir / "bootstrap.log")
    log = logging.getLogger("spotrun")

    try:
        config = RunConfig.from_file(args.config)
        imds = ImdsClient()
        imds.check_reachable()
        identity = imds.instance_identity()
    except (ConfigError, ImdsUnavailableError) as error:
        log.error("%s", error)
        return EXIT_USAGE
    log.info("instance %s (%s, %s) starting run %s", identity.instance_id,
             identity.instance_type, identity.availability_zone, config.run_id)

    supervisor = Supervisor(config, imds, identity, work_dir, code_dir=Path.cwd())
    # At power-off the operating system sends SIGTERM to every process.
    signal.signal(signal.SIGTERM, lambda *_: supervisor.request_shutdown())
    try:
        return supervisor.run()
    except (ClientError, BotoCoreError, OSError) as error:
        log.exception("supervisor crashed: %s", error)
        record_bootstrap_crash(supervisor, error)
        return 1


def _configure_logging(log_path: Path) -> None:
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in (logging.StreamHandler(sys.stderr), logging.FileHandler(log_path)):
        handler.setFormatter(formatter)
        root.addHandler(handler)
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
