"""Shared fixtures: a moto server over real HTTP on loopback, and a fresh S3 bucket."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
REGION = "us-east-1"
# moto accepts any key while it does not enforce IAM.
DUMMY_ACCESS_KEY = "testing"
DUMMY_SECRET_KEY = "testing"
SERVER_START_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_listening(server: subprocess.Popen, port: int, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the moto server exited with code {server.returncode} "
                               f"before listening; see {log_path}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the moto server did not listen on port {port} within "
                       f"{SERVER_START_TIMEOUT_S:.0f} s; see {log_path}")


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start ``emulator.moto_server`` without IAM enforcement; yield its endpoint URL.

    The server binds 127.0.0.1, but clients must use the returned ``localhost`` URL
    because moto resolves some URLs (such as a stack's TemplateURL) by host name.
    """
    port = _free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log_path, "wb") as server_log:
        server = subprocess.Popen(
            [sys.executable, "-m", "emulator.moto_server", "-H", "127.0.0.1", "-p", str(port)],
            cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=server_log,
            stderr=subprocess.STDOUT)
    try:
        _wait_until_listening(server, port, log_path)
        yield f"http://localhost:{port}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def make_client(service: str, endpoint: str):
    """Return a client for the moto server, signed with the dummy credentials."""
    return boto3.client(service, endpoint_url=endpoint, region_name=REGION,
                        aws_access_key_id=DUMMY_ACCESS_KEY,
                        aws_secret_access_key=DUMMY_SECRET_KEY)


@pytest.fixture
def s3_bucket(moto_endpoint: str) -> tuple[object, str]:
    """Return (s3_client, bucket_name) for a bucket created for this test alone."""
    s3 = make_client("s3", moto_endpoint)
    bucket = f"test-{uuid.uuid4().hex[:20]}"
    s3.create_bucket(Bucket=bucket)
    return s3, bucket
