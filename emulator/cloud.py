"""The local cloud's AWS side: a moto server over HTTP, an admin identity, the CDK CLI.

moto enforces IAM (INITIAL_NO_AUTH_ACTION_COUNT): the first requests create an admin user
with an access key, and every request after them must be signed by a known identity and
allowed by its policies. The CDK CLI uses the admin key, as a developer's profile would;
instances use their role's temporary credentials from the emulated STS through IMDS.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
from botocore.config import Config

log = logging.getLogger("spotrun.emulator")

REGION = "us-east-1"
# The requests that set up the admin identity before IAM enforcement begins.
ADMIN_SETUP_REQUESTS = 3
ADMIN_POLICY = {"Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
# Must match the user name of emulator.moto_server.SERVICE_USERS.
EC2_SERVICE_USER = "emulated-ec2-service"
CLIENT_CONFIG = Config(retries={"mode": "standard", "max_attempts": 5})


class CloudError(RuntimeError):
    """The local cloud could not start, or a CDK command failed."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalCloud:
    """A moto server on 127.0.0.1 that clients reach as http://localhost:PORT.

    moto resolves the TemplateURL of a CloudFormation stack by host name, which is why
    clients use ``localhost`` rather than the address the server binds.
    """

    def __init__(self, work_dir: Path, project_root: Path) -> None:
        self.work_dir = work_dir
        self.project_root = project_root
        self.port = free_port()
        self.endpoint = f"http://localhost:{self.port}"
        self.region = REGION
        self.account_id = ""
        self._server: subprocess.Popen | None = None
        self._access_key = ""
        self._secret_key = ""
        self._service_key = ("", "")

    # Server --------------------------------------------------------------------------

    def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        server_log = open(self.work_dir / "moto.log", "wb")
        env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT=str(ADMIN_SETUP_REQUESTS))
        self._server = subprocess.Popen(
            [sys.executable, "-m", "emulator.moto_server", "-H", "127.0.0.1",
             "-p", str(self.port)],
            cwd=self.project_root, env=env, stdout=server_log, stderr=subprocess.STDOUT)
        self._wait_until_listening(timeout_s=30)
        self._create_admin()
        self.account_id = self.client("sts").get_caller_identity()["Account"]
        self._create_ec2_service_identity()

    def _wait_until_listening(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._server.poll() is not None:
                raise CloudError(f"the moto server exited with code {self._server.returncode};"
                                 f" see {self.work_dir / 'moto.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise CloudError(f"the moto server did not listen on port {self.port} within "
                         f"{timeout_s:.0f} s; see {self.work_dir / 'moto.log'}")

    def _create_admin(self) -> None:
        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name=self.region,
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="spotrun-admin")
        iam.put_user_policy(UserName="spotrun-admin", PolicyName="administrator",
                            PolicyDocument=json.dumps(ADMIN_POLICY))
        key = iam.create_access_key(UserName="spotrun-admin")["AccessKey"]
        self._access_key = key["AccessKeyId"]
        self._secret_key = key["SecretAccessKey"]

    def _create_ec2_service_identity(self) -> None:
        """Create the identity that plays EC2 when it hands an instance its role."""
        iam = self.client("iam")
        iam.create_user(UserName=EC2_SERVICE_USER)
        iam.put_user_policy(UserName=EC2_SERVICE_USER, PolicyName="assume-instance-roles",
                            PolicyDocument=json.dumps({
                                "Version": "2012-10-17",
                                "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                               "Resource": "*"}]}))
        key = iam.create_access_key(UserName=EC2_SERVICE_USER)["AccessKey"]
        self._service_key = (key["AccessKeyId"], key["SecretAccessKey"])

    def ec2_service_client(self, service: str):
        """Return a client signed as the EC2 service (see emulator.moto_server)."""
        access_key, secret_key = self._service_key
        return boto3.client(service, endpoint_url=self.endpoint, region_name=self.region,
                            aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                            config=CLIENT_CONFIG)

    def stop(self) -> None:
        if self._server is not None and self._server.poll() is None:
            self._server.terminate()
            try:
                self._server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._server.kill()
                self._server.wait()

    # Clients ------------------------------------------------------------------------

    def client(self, service: str):
        return boto3.client(service, endpoint_url=self.endpoint, region_name=self.region,
                            aws_access_key_id=self._access_key,
                            aws_secret_access_key=self._secret_key, config=CLIENT_CONFIG)

    def admin_env(self) -> dict[str, str]:
        """Environment of a developer shell whose AWS profile points at this cloud."""
        env = {key: value for key, value in os.environ.items()
               if not key.startswith("AWS_")}
        env.update({
            "AWS_ACCESS_KEY_ID": self._access_key,
            "AWS_SECRET_ACCESS_KEY": self._secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION": "1",
            "CDK_DISABLE_VERSION_CHECK": "1",
            "CDK_DISABLE_CLI_TELEMETRY": "true",
            "NODE_NO_WARNINGS": "1",
        })
        return env

    # CDK ----------------------------------------------------------------------------

    def cdk(self, arguments: list[str], context: dict[str, object] | None = None,
            log_name: str = "cdk") -> str:
        """Run the project's pinned CDK CLI against this cloud; return its output."""
        executable = self.project_root / "node_modules" / ".bin" / "cdk"
        if not executable.exists():
            raise CloudError(f"the CDK CLI is not installed at {executable}; run `npm ci` "
                             f"(or `make demo`, which does it)")
        command = [str(executable), *arguments, "--app", f"{sys.executable} app.py",
                   "--no-notices", "--no-color"]
        for name, value in (context or {}).items():
            text = value if isinstance(value, str) else json.dumps(value)
            command += ["-c", f"{name}={text}"]
        output_path = self.work_dir / f"{log_name}.log"
        with open(output_path, "wb") as output:
            result = subprocess.run(command, cwd=self.project_root, env=self.admin_env(),
                                    stdout=output, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, timeout=900)
        text = output_path.read_text(encoding="utf-8", errors="replace")
        if result.returncode != 0:
            tail = "\n".join(text.strip().splitlines()[-15:])
            raise CloudError(f"`cdk {' '.join(arguments)}` failed with code "
                             f"{result.returncode} (full output: {output_path}):\n{tail}")
        return text

    def remove_cdk_output(self) -> None:
        shutil.rmtree(self.project_root / "cdk.out", ignore_errors=True)
