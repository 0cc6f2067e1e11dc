"""ml.digits under real torchrun (ml.launch) on CPU with gloo, as subprocesses.

Two processes on one machine stand in for two GPUs; two torchrun agents with a c10d
rendezvous on loopback stand in for two instances. The runs use a narrow model.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ml import contract
from ml.launch import exit_code_of_failures

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data" / "digits"
TRAINING_ARGS = [
    "--epochs", "3",
    "--batch-size", "64",
    "--channels", "8",
    "--hidden", "32",
    "--lr", "0.01",
    "--milestones", "1,2",
    "--gamma", "0.5",
    "--device", "cpu",
]  # fmt: skip
STEPS = 69  # 23 steps per epoch of 1438 training samples at batch size 64
TIMEOUT_SECONDS = 180
COLLECTIVE_TIMEOUT_SECONDS = 10


@dataclass
class Node:
    """Folders of one emulated instance; every process that continues the run shares them."""

    root: Path

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def progress_file(self) -> Path:
        return self.root / "progress.jsonl"

    @property
    def metrics(self) -> dict:
        return json.loads((self.root / "output" / contract.METRICS_NAME).read_text())

    def env(self, resume_from: Path | None) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            contract.ENV_RUN_ID: "distributed-test",
            contract.ENV_DATA_DIR: str(DATA_DIR),
            contract.ENV_OUTPUT_DIR: str(self.root / "output"),
            contract.ENV_CHECKPOINT_DIR: str(self.checkpoint_dir),
            contract.ENV_PROGRESS_FILE: str(self.progress_file),
            contract.ENV_RESUME_FROM: str(resume_from) if resume_from else "",
            contract.ENV_COLLECTIVE_TIMEOUT: str(COLLECTIVE_TIMEOUT_SECONDS),
            "OMP_NUM_THREADS": "1",
        })
        return env

    def progress(self) -> list[dict]:
        if not self.progress_file.exists():
            return []
        return [json.loads(line) for line in self.progress_file.read_text().splitlines() if line]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(node: Node, torchrun_args: list[str], *, resume_from: Path | None = None,
           extra: list[str] = ()) -> subprocess.Popen:
    command = [sys.executable, "-m", "ml.launch", *torchrun_args, "--max-restarts=0",
               "-m", "ml.digits", *TRAINING_ARGS, *extra]
    node.root.mkdir(parents=True, exist_ok=True)
    log = open(node.root / "launch.log", "ab")
    return subprocess.Popen(command, cwd=REPO_ROOT, env=node.env(resume_from),
                            stdout=log, stderr=subprocess.STDOUT)


def single_node_args() -> list[str]:
    return ["--nnodes=1", "--standalone", "--nproc-per-node=2"]


def two_node_args(port: int, is_host: bool, run: str) -> list[str]:
    return ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={run}",
            f"--rdzv-conf=is_host={'true' if is_host else 'false'},join_timeout=60",
            "--local-addr=127.0.0.1"]


def wait(process: subprocess.Popen, node: Node) -> int:
    try:
        return process.wait(timeout=TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        log = (node.root / "launch.log").read_text(errors="replace")
        pytest.fail(f"torchrun did not exit within {TIMEOUT_SECONDS} s:\n{log[-3000:]}")


def wait_for_step(node: Node, step: int) -> None:
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        progress = node.progress()
        if progress and progress[-1]["step"] >= step:
            return
        time.sleep(0.05)
    pytest.fail(f"training never reached step {step}")


def worker_pids(launcher: subprocess.Popen) -> list[int]:
    from bootstrap.trainer import child_pids

    deadline = time.monotonic() + TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        pids = child_pids(launcher.pid)
        if pids:
            return pids
        time.sleep(0.05)
    pytest.fail("torchrun started no training process")


def lr_by_step(node: Node) -> dict[int, float]:
    return {record["step"]: record["lr"] for record in node.progress()}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Node:
    """An uninterrupted two-process run on one machine."""
    node = Node(tmp_path_factory.mktemp("baseline"))
    code = wait(launch(node, single_node_args()), node)
    assert code == contract.EXIT_COMPLETED, (node.root / "launch.log").read_text()[-3000:]
    return node


def test_exit_codes_of_failed_processes():
    assert exit_code_of_failures([]) == contract.EXIT_COMPLETED
    assert exit_code_of_failures([75, 75]) == contract.EXIT_SAVED
    assert exit_code_of_failures([76, 75]) == contract.EXIT_PEER_LOST
    assert exit_code_of_failures([76, -9]) == 1
    assert exit_code_of_failures([2, 76]) == 2
    # torchrun stops the remaining processes with SIGTERM once one has exited.
    assert exit_code_of_failures([75, -15]) == contract.EXIT_SAVED
    assert exit_code_of_failures([76, -15]) == contract.EXIT_PEER_LOST
    assert exit_code_of_failures([-15]) == 1


def test_two_processes_complete(baseline):
    metrics = baseline.metrics
    assert metrics["final_step"] == STEPS
    assert metrics["world_size"] == 2
    assert metrics["val_accuracy"] > 0.8
    # Only local rank 0 writes progress: one line per step.
    assert [record["step"] for record in baseline.progress()] == list(range(1, STEPS + 1))


def test_one_rank_sigterm_resumes_exactly(tmp_path, baseline):
    node = Node(tmp_path / "node")
    launcher = launch(node, single_node_args(), extra=["--step-delay", "0.05"])
    wait_for_step(node, 30)
    # Only one of the two processes gets the request; both must save the same step.
    os.kill(worker_pids(launcher)[0], signal.SIGTERM)
    assert wait(launcher, node) == contract.EXIT_SAVED

    folders = sorted(node.checkpoint_dir.iterdir())
    assert len(folders) == 1
    saved_step = contract.parse_step_folder(folders[0].name)
    assert 30 <= saved_step < STEPS
    assert contract.read_verified_manifest(folders[0]) is not None

    code = wait(launch(node, single_node_args(), resume_from=folders[0]), node)
    assert code == contract.EXIT_COMPLETED
    assert node.metrics["final_weights_sha256"] == baseline.metrics["final_weights_sha256"]
    assert lr_by_step(node) == lr_by_step(baseline)


def test_two_nodes_match_after_interruption(tmp_path):
    first, second = Node(tmp_path / "first"), Node(tmp_path / "second")
    port = free_port()
    host = launch(first, two_node_args(port, True, "uninterrupted"))
    peer = launch(second, two_node_args(port, False, "uninterrupted"))
    assert wait(host, first) == contract.EXIT_COMPLETED
    assert wait(peer, second) == contract.EXIT_COMPLETED
    uninterrupted = first.metrics["final_weights_sha256"]
    assert second.metrics["final_weights_sha256"] == uninterrupted

    a, b = Node(tmp_path / "a"), Node(tmp_path / "b")
    port = free_port()
    host = launch(a, two_node_args(port, True, "round-1"), extra=["--step-delay", "0.05"])
    peer = launch(b, two_node_args(port, False, "round-1"), extra=["--step-delay", "0.05"])
    wait_for_step(b, 40)
    os.kill(worker_pids(peer)[0], signal.SIGTERM)
    assert wait(host, a) == contract.EXIT_SAVED
    assert wait(peer, b) == contract.EXIT_SAVED
    # Each instance has its own full copy of the same checkpoint.
    saved = {node.root.name: sorted(path.name for path in node.checkpoint_dir.iterdir())
             for node in (a, b)}
    assert saved["a"] == saved["b"]
    assert len(saved["a"]) == 1

    port = free_port()
    step_folder = saved["a"][0]
    host = launch(a, two_node_args(port, True, "round-2"),
                  resume_from=a.checkpoint_dir / step_folder)
    peer = launch(b, two_node_args(port, False, "round-2"),
                  resume_from=b.checkpoint_dir / step_folder)
    assert wait(host, a) == contract.EXIT_COMPLETED
    assert wait(peer, b) == contract.EXIT_COMPLETED
    assert a.metrics["final_weights_sha256"] == uninterrupted
    assert b.metrics["final_weights_sha256"] == uninterrupted


def test_hung_peer_ends_collective_with_peer_lost(tmp_path):
    a, b = Node(tmp_path / "a"), Node(tmp_path / "b")
    port = free_port()
    host = launch(a, two_node_args(port, True, "hang"), extra=["--step-delay", "0.05"])
    peer = launch(b, two_node_args(port, False, "hang"), extra=["--step-delay", "0.05"])
    wait_for_step(a, 10)
    stopped = worker_pids(peer)
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        # The host's next all-reduce waits for the stopped peer until the collective
        # timeout, then the process exits with EXIT_PEER_LOST instead of hanging.
        assert wait(host, a) == contract.EXIT_PEER_LOST
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGKILL)
        peer.kill()
        peer.wait()
    log = (a.root / "launch.log").read_text()
    assert "exiting with 76" in log
