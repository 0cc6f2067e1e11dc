"""Checkpoint benchmark: blocked time, S3 goodput, resume time and training slowdown.

``python -m bench checkpoint`` builds an MLP with Adam state of about ``--state-mb``
megabytes, starts ``emulator.moto_server`` on a free loopback port and measures, in one
run, the figures that docs/benchmarks.md explains. It prints a table and, last, one
JSON line with the ratios.

The resume measurement runs this module in child processes
(``python -m bench.checkpoint --resume-child ...``), because it times a process from
its start.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import boto3
import torch
from boto3.s3.transfer import TransferConfig

from bootstrap.store import RunStore
from ml import contract
from ml.checkpoint import Checkpointer

REPO_ROOT = Path(__file__).resolve().parent.parent
REGION = "us-east-1"
INSTANCE_ID = "i-bench"
RUN_ID = "bench"
SERVER_START_TIMEOUT_S = 30.0
# Adam keeps two float32 values per parameter, so the state is 12 bytes per parameter.
BYTES_PER_PARAMETER = 12
BATCH = 64
SEED = 7

# Transfer settings tried for the raw boto3 rates. The best one is the reference.
RAW_TRANSFER_CONFIGS = {
    "boto3 default (RunStore)": TransferConfig(),
    "16 MiB parts x8": TransferConfig(multipart_threshold=16 << 20, multipart_chunksize=16 << 20,
                                      max_concurrency=8),
    "64 MiB parts x4": TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20,
                                      max_concurrency=4),
    "single request": TransferConfig(multipart_threshold=1 << 40),
}


# ---------------------------------------------------------------------------
# Set-up


def build_training(state_mb: float, width: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Build an MLP of ``width``-wide layers whose model + Adam state is about ``state_mb`` MB."""
    torch.manual_seed(SEED)
    parameters_per_layer = width * width + width
    layers = max(1, round(state_mb * 1e6 / BYTES_PER_PARAMETER / parameters_per_layer))
    modules: list[torch.nn.Module] = []
    for _ in range(layers):
        modules += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    model = torch.nn.Sequential(*modules[:-1])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    return model, optimizer


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, width: int) -> None:
    inputs = torch.randn(BATCH, width)
    optimizer.zero_grad(set_to_none=True)
    loss = model(inputs).square().mean()
    loss.backward()
    optimizer.step()


def make_s3_client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name=REGION,
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MotoServer:
    """``emulator.moto_server`` on a free loopback port, stopped on exit."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.endpoint = f"http://localhost:{self.port}"
        self._log = open(log_path, "wb")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "emulator.moto_server", "-H", "127.0.0.1", "-p", str(self.port)],
            cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)

    def __enter__(self) -> "MotoServer":
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"the moto server exited with code {self._process.returncode}; "
                                   f"see {self._log.name}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.__exit__()
        raise RuntimeError(f"the moto server did not listen on port {self.port} within "
                           f"{SERVER_START_TIMEOUT_S:.0f} s")

    def __exit__(self, *exc_info: object) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._log.close()


# ---------------------------------------------------------------------------
# Measurements


@dataclass
class Results:
    rows: list[tuple[str, str]]

    def add(self, name: str, value: str) -> None:
        self.rows.append((name, value))
        print(f"  {name:<58} {value}", flush=True)


def measure_memcpy_bandwidth(total_bytes: int, repeats: int = 5) -> float:
    """Return the best bytes/s of ``Tensor.copy_`` between two pre-faulted float32 tensors."""
    count = max(1, min(total_bytes, 512 << 20) // 4)
    source = torch.ones(count)
    target = torch.zeros(count)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - started)
    return count * 4 / best


def measure_saves(checkpointer: Checkpointer, model, optimizer, width: int, repeats: int,
                  first_step: int) -> tuple[list[float], list[float], int]:
    """Save ``repeats`` times; return (blocked seconds, save-to-commit seconds, bytes).

    The first save only warms up the host buffers and is not counted.
    """
    blocked, total = [], []
    step = first_step
    size = 0
    for index in range(repeats + 1):
        train_step(model, optimizer, width)
        step += 1
        started = time.perf_counter()
        checkpointer.save(step, epoch=0)
        result = checkpointer.wait()
        elapsed = time.perf_counter() - started
        size = result.total_bytes
        if index > 0:
            blocked.append(result.blocked_seconds)
            total.append(elapsed)
    return blocked, total, size


def checkpoint_files(folder: Path) -> list[Path]:
    manifest = contract.read_verified_manifest(folder, check_hashes=False)
    return [folder / item.name for item in manifest.files]


def measure_raw_uploads(s3, bucket: str, files: list[Path]) -> dict[str, float]:
    """Return seconds to upload ``files`` with each of RAW_TRANSFER_CONFIGS."""
    seconds = {}
    for name, config in RAW_TRANSFER_CONFIGS.items():
        started = time.perf_counter()
        for path in files:
            s3.upload_file(str(path), bucket, f"raw/{uuid.uuid4().hex}/{path.name}", Config=config)
        seconds[name] = time.perf_counter() - started
    return seconds


def measure_raw_downloads(s3, bucket: str, files: list[Path], scratch: Path) -> dict[str, float]:
    """Upload ``files`` once, then return seconds to download them with each config."""
    keys = []
    for path in files:
        key = f"raw-download/{path.name}"
        s3.upload_file(str(path), bucket, key)
        keys.append(key)
    seconds = {}
    for name, config in RAW_TRANSFER_CONFIGS.items():
        started = time.perf_counter()
        for key in keys:
            s3.download_file(bucket, key, str(scratch / "download.bin"), Config=config)
        seconds[name] = time.perf_counter() - started
    started = time.perf_counter()
    for key in keys:
        with open(scratch / "download.bin", "wb") as handle:
            shutil.copyfileobj(s3.get_object(Bucket=bucket, Key=key)["Body"], handle, 8 << 20)
    seconds["get_object stream"] = time.perf_counter() - started
    return seconds


def measure_full_path(checkpointer: Checkpointer, store: RunStore, lease, model, optimizer,
                      width: int, step: int) -> tuple[float, float, float, object]:
    """Save and upload one checkpoint, uploading each file as soon as it is written.

    The files go to S3 while the writer still writes the next ones, and the manifest
    and ``latest.json`` follow once the local commit and every file upload are done,
    which is the order that ``RunStore.upload_checkpoint`` keeps. Returns (seconds from
    snapshot to committed manifest in S3, of which local save, of which the rest, lease).
    """
    train_step(model, optimizer, width)
    uploads: list[concurrent.futures.Future] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        checkpointer.on_file_written = lambda path, _item: uploads.append(
            pool.submit(store._upload_checkpoint_file, path))
        started = time.perf_counter()
        try:
            folder = checkpointer.save(step, epoch=0)
            checkpointer.wait()
        finally:
            checkpointer.on_file_written = None
        saved = time.perf_counter()
        # As the supervisor does, check the sizes only, because the writer has just hashed the files.
        manifest = contract.read_verified_manifest(folder, check_hashes=False)
        for upload in uploads:
            upload.result()
    lease = store._commit_checkpoint(folder, manifest, lease, started)
    finished = time.perf_counter()
    return finished - started, saved - started, finished - saved, lease


def measure_sequential_path(checkpointer: Checkpointer, store: RunStore, lease, model, optimizer,
                            width: int, step: int) -> tuple[float, object]:
    """Save one checkpoint, then upload the committed folder as the supervisor does.

    Returns (seconds from snapshot to committed manifest in S3, lease).
    """
    train_step(model, optimizer, width)
    started = time.perf_counter()
    folder = checkpointer.save(step, epoch=0)
    checkpointer.wait()
    # The supervisor checks sizes before the upload, and resume checks every hash.
    manifest = contract.read_verified_manifest(folder, check_hashes=False)
    lease = store.upload_checkpoint(folder, manifest, lease)
    return time.perf_counter() - started, lease


def measure_naive(s3, bucket: str, model, optimizer) -> float:
    """Return seconds for torch.save of model and optimizer into memory plus one put_object."""
    started = time.perf_counter()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    s3.put_object(Bucket=bucket, Key=f"naive/{uuid.uuid4().hex}.pt", Body=buffer)
    return time.perf_counter() - started


def measure_training(model, optimizer, width: int, steps: int, every: int | None,
                     checkpoint_dir: Path, first_step: int) -> tuple[float, list[float], list[float]]:
    """Train ``steps`` steps, saving every ``every`` steps (never when None).

    Returns (total seconds, step seconds with no save in flight, step seconds with a
    save in flight). The run ends with the last save committed.
    """
    checkpointer = Checkpointer(checkpoint_dir, RUN_ID, model, optimizer)
    idle, busy = [], []
    started = time.perf_counter()
    for index in range(1, steps + 1):
        # Reads private state: the receiver thread lives until the writer commits the save.
        writing = checkpointer._thread is not None and checkpointer._thread.is_alive()
        step_started = time.perf_counter()
        train_step(model, optimizer, width)
        (busy if writing else idle).append(time.perf_counter() - step_started)
        if every is not None and index % every == 0:
            checkpointer.save(first_step + index, epoch=0)
    checkpointer.close()
    return time.perf_counter() - started, idle, busy


def _background_writer(total_bytes: int, directory: str, stop: multiprocessing.synchronize.Event) -> None:
    """Write a state of ``total_bytes`` with torch.save, fsync and hash, until ``stop``."""
    torch.set_num_threads(1)
    state = {"values": torch.ones(total_bytes // 4)}
    path = Path(directory) / "process-writer.pt"
    while not stop.is_set():
        with open(path, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        contract.sha256_file(path)


def measure_step_with_writer_process(model, optimizer, width: int, steps: int, total_bytes: int,
                                     directory: Path) -> list[float]:
    """Return step seconds while another process writes a checkpoint-sized file."""
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    writer = context.Process(target=_background_writer, args=(total_bytes, str(directory), stop))
    writer.start()
    # Let the writer import torch and start writing before timing.
    time.sleep(4.0)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        train_step(model, optimizer, width)
        times.append(time.perf_counter() - started)
    stop.set()
    writer.join()
    return times


def measure_resume(endpoint: str, bucket: str, run_id: str, state_mb: float, width: int,
                   resume: bool) -> float:
    """Return seconds from process start to the end of the first training step."""
    command = [sys.executable, "-m", "bench.checkpoint", "--resume-child", "--endpoint", endpoint,
               "--bucket", bucket, "--run-id", run_id, "--state-mb", str(state_mb),
               "--width", str(width)]
    if not resume:
        command.append("--cold")
    started = time.time()
    output = subprocess.run(command, cwd=REPO_ROOT, check=True, capture_output=True, text=True).stdout
    finished = json.loads(output.strip().splitlines()[-1])["first_step_done"]
    return finished - started


def resume_child(args: argparse.Namespace) -> int:
    """Build the training state, resume it from S3 unless ``--cold``, train one step."""
    model, optimizer = build_training(args.state_mb, args.width)
    if not args.cold:
        store = RunStore(make_s3_client(args.endpoint), args.bucket, args.run_id)
        with tempfile.TemporaryDirectory() as scratch:
            manifest = store.download_newest_checkpoint(Path(scratch))
            if manifest is None:
                print(f"no checkpoint of run {args.run_id} in bucket {args.bucket}", file=sys.stderr)
                return 1
            checkpointer = Checkpointer(Path(scratch) / "local", RUN_ID, model, optimizer)
            checkpointer.load(Path(scratch) / contract.step_folder_name(manifest.step))
    train_step(model, optimizer, args.width)
    print(json.dumps({"first_step_done": time.time()}))
    return 0


# ---------------------------------------------------------------------------
# The run


def run(args: argparse.Namespace) -> dict[str, float]:
    results = Results([])
    scratch = Path(tempfile.mkdtemp(prefix="spotrun-bench-", dir=args.work_dir))
    try:
        with MotoServer(scratch / "moto.log") as server:
            return _run(args, results, scratch, server)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run(args: argparse.Namespace, results: Results, scratch: Path, server: MotoServer) -> dict[str, float]:
    s3 = make_s3_client(server.endpoint)
    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    model, optimizer = build_training(args.state_mb, args.width)
    train_step(model, optimizer, args.width)  # creates the Adam state
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    state_bytes += sum(t.numel() * t.element_size() for entry in optimizer.state.values()
                       for t in entry.values() if isinstance(t, torch.Tensor))
    print(f"state: {state_bytes / 1e6:.0f} MB (model + Adam), width {args.width}, "
          f"{torch.get_num_threads()} torch threads, moto at {server.endpoint}", flush=True)

    print("1. blocked time per checkpoint", flush=True)
    bandwidth = measure_memcpy_bandwidth(state_bytes)
    checkpointer = Checkpointer(scratch / "checkpoints", RUN_ID, model, optimizer)
    blocked, total, checkpoint_bytes = measure_saves(checkpointer, model, optimizer, args.width,
                                                     args.repeats, first_step=0)
    async_blocked = statistics.median(blocked)
    sync_blocked = statistics.median(total)
    memcpy_seconds = state_bytes / bandwidth
    results.add("memcpy bandwidth (Tensor.copy_)", f"{bandwidth / 1e9:.2f} GB/s")
    results.add("state bytes / memcpy bandwidth", f"{memcpy_seconds * 1e3:.1f} ms")
    results.add("async save: training blocked (median)", f"{async_blocked * 1e3:.1f} ms")
    results.add("sync save: training blocked (median)", f"{sync_blocked * 1e3:.1f} ms")

    print("2. snapshot to committed checkpoint in S3", flush=True)
    files = checkpoint_files(checkpointer.wait().folder)
    raw_upload = measure_raw_uploads(s3, bucket, files)
    for name, seconds in raw_upload.items():
        results.add(f"raw upload_file, {name}", f"{checkpoint_bytes / seconds / 1e6:.0f} MB/s")
    best_upload_rate = checkpoint_bytes / min(raw_upload.values())

    store = RunStore(s3, bucket, RUN_ID)
    lease = store.try_acquire_lease(INSTANCE_ID, 3600.0)
    sequential = []
    for repeat in range(args.repeats):
        seconds, lease = measure_sequential_path(checkpointer, store, lease, model, optimizer, args.width,
                                                 step=100 + repeat)
        sequential.append(seconds)
    full, local, upload = [], [], []
    for repeat in range(args.repeats):
        seconds, local_seconds, upload_seconds, lease = measure_full_path(
            checkpointer, store, lease, model, optimizer, args.width, step=200 + repeat)
        full.append(seconds)
        local.append(local_seconds)
        upload.append(upload_seconds)
    checkpointer.close()
    full_seconds = statistics.median(full)
    results.add("save, then upload_checkpoint (supervisor; median)", f"{statistics.median(sequential):.2f} s")
    results.add("full path: snapshot to committed in S3 (median)", f"{full_seconds:.2f} s")
    results.add("  of which local save, fsync and commit", f"{statistics.median(local):.2f} s")
    results.add("  of which remaining uploads and S3 commit", f"{statistics.median(upload):.2f} s")
    results.add("full path goodput", f"{checkpoint_bytes / full_seconds / 1e6:.0f} MB/s")
    naive_seconds = statistics.median(measure_naive(s3, bucket, model, optimizer) for _ in range(args.repeats))
    results.add("naive: torch.save to memory + put_object (median)", f"{naive_seconds:.2f} s")

    print("4. resume from S3", flush=True)
    raw_download = measure_raw_downloads(s3, bucket, files, scratch)
    for name, seconds in raw_download.items():
        results.add(f"raw download, {name}", f"{checkpoint_bytes / seconds / 1e6:.0f} MB/s")
    best_download_rate = checkpoint_bytes / min(raw_download.values())
    cold = min(measure_resume(server.endpoint, bucket, RUN_ID, args.state_mb, args.width, resume=False)
               for _ in range(2))
    resumed = min(measure_resume(server.endpoint, bucket, RUN_ID, args.state_mb, args.width, resume=True)
                  for _ in range(2))
    results.add("cold start to first step (best of 2)", f"{cold:.2f} s")
    results.add("resume from S3 to first step (best of 2)", f"{resumed:.2f} s")

    print("6. training slowdown", flush=True)
    never, idle_steps, _ = measure_training(model, optimizer, args.width, args.train_steps, None,
                                            scratch / "never", first_step=1000)
    every, idle_with, busy_with = measure_training(model, optimizer, args.width, args.train_steps, 10,
                                                   scratch / "every", first_step=2000)
    with_process = measure_step_with_writer_process(model, optimizer, args.width, args.gil_steps,
                                                    checkpoint_bytes, scratch)
    results.add(f"{args.train_steps} steps, no checkpoint", f"{never:.2f} s")
    results.add(f"{args.train_steps} steps, checkpoint every 10 steps", f"{every:.2f} s")
    results.add("step time, no save in flight (median)", f"{statistics.median(idle_steps) * 1e3:.1f} ms")
    if busy_with:
        results.add("step time, save in flight (median)", f"{statistics.median(busy_with) * 1e3:.1f} ms")
    results.add("step time, nice-0 writer loop process running (median)",
                f"{statistics.median(with_process) * 1e3:.1f} ms")

    return {
        "state_mb": round(state_bytes / 1e6, 1),
        "p1_sync_over_async_blocked": round(sync_blocked / async_blocked, 2),
        "p1_blocked_over_memcpy": round(async_blocked / memcpy_seconds, 2),
        "p2_goodput_over_raw_upload": round(checkpoint_bytes / full_seconds / best_upload_rate, 3),
        "p2_over_naive": round(naive_seconds / full_seconds, 3),
        "p4_resume_over_model": round(resumed / (checkpoint_bytes / best_download_rate + cold), 3),
        "p6_slowdown": round(every / never - 1, 4),
        "step_ms_idle": round(statistics.median(idle_steps) * 1e3, 1),
        "step_ms_save_in_flight": round(statistics.median(busy_with) * 1e3, 1) if busy_with else None,
        "step_ms_writer_process": round(statistics.median(with_process) * 1e3, 1),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench checkpoint", description=__doc__.splitlines()[0])
    parser.add_argument("--state-mb", type=float, default=300.0,
                        help="size of model + Adam state in MB (default: 300)")
    parser.add_argument("--width", type=int, default=2048, help="width of the MLP layers (default: 2048)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="repetitions of each save and upload measurement; medians are reported (default: 3)")
    parser.add_argument("--train-steps", type=int, default=60,
                        help="training steps of each slowdown run (default: 60)")
    parser.add_argument("--gil-steps", type=int, default=20,
                        help="steps timed while a separate process writes (default: 20)")
    parser.add_argument("--work-dir", default=None,
                        help="folder for the temporary checkpoints (default: the system temp folder)")
    parser.add_argument("--resume-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--bucket", help=argparse.SUPPRESS)
    parser.add_argument("--run-id", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.resume_child:
        return resume_child(args)
    summary = run(args)
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
