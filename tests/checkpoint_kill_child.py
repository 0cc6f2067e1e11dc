"""Child process for tests/test_checkpoint_kill.py: save or upload checkpoints, and
SIGKILL itself at a chosen event.

The child counts events as they happen and sends itself SIGKILL just before event
number ``kill_at`` (0-based) would run, so the kill lands at a deterministic point.
With ``kill_at`` None it records every event in order and exits normally, which gives
the test the list of points it can kill at.

Events of a local save (``ml.checkpoint.Checkpointer``). The snapshot events happen
in the trainer process, the others in its writer process, which runs ``writer_main``
of this module. Both processes number the events in the same file, and a kill in the
writer kills the trainer first, so the kill is always a SIGKILL of the trainer:

* ``snapshot <n>``: before the n-th tensor is copied into the host buffers.
* ``open <file>``: before a file is opened for writing (checkpoint files and the
  temporary manifest).
* ``write <file> <MiB>``: before each MiB written to a checkpoint file, and before the
  first byte of each file (MiB 0).
* ``fsync before`` and ``fsync after``: around every ``os.fsync`` (files, manifest,
  folders).
* ``rename before`` and ``rename after``: around the ``os.replace`` that commits the
  manifest.

Events of an upload (``bootstrap.store.RunStore``), from botocore's event hooks and
from the s3transfer file reader:

* ``call <Operation> <key name>`` and ``done <Operation> <key name>``: before an S3
  request is built and after its response is parsed.
* ``body <file> <MiB>``: before each MiB of a part or object body is read for sending,
  so a kill there cuts a request off in the middle of its body.
"""

from __future__ import annotations

import builtins
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import ml.checkpoint
from ml import contract
from ml.checkpoint import Checkpointer

# The writer process of every save child imports this module, so the modules that only
# the trainer or the upload child need are imported in functions. The test preloads
# them in its forkserver (FORKSERVER_PRELOAD), so they cost no time in the children.
# The first Adam imports torch._dynamo, which takes seconds.
FORKSERVER_PRELOAD = ["torch._dynamo", "boto3", "s3transfer.utils", "bootstrap.store", __name__]
# Environment variables that pass the event file and kill point to the writer process.
ENV_EVENTS_PATH = "KILL_CHILD_EVENTS_PATH"
ENV_KILL_AT = "KILL_CHILD_KILL_AT"

REGION = "us-east-1"
INSTANCE_ID = "i-kill-child"
LEASE_STALE_AFTER_S = 3600.0
MIB = 1 << 20
# The minimum part size of S3 (and of moto), so that each few-MB file has several parts.
PART_BYTES = 5 * MIB
# Width of the hidden layers: the model holds about 1.4 M float32 values (5.5 MB) and
# Adam holds twice that, so model.pt is uploaded in two parts and optimizer.pt in three.
WIDTH = 832
SEED = 1234
BATCH = 32
RUN_ID = "kill-run"


@dataclass(frozen=True)
class ChildConfig:
    """What one child does, and where it sends itself SIGKILL."""

    mode: str  # "save" or "upload"
    checkpoint_dir: str
    steps: tuple[int, ...]  # steps to save, or committed local steps to upload
    events_path: str  # the child appends one event name per line
    kill_at: int | None = None
    endpoint: str = ""
    bucket: str = ""
    run_id: str = RUN_ID
    keep_checkpoints: int = 1  # upload mode: prune older S3 checkpoints after each upload


class EventCounter:
    """Counts events, appends their names to a file and kills the process at one.

    The count is the number of names already in the file, so the trainer and its
    writer process, which take turns, number their events in one sequence. A lock
    keeps the count and the write together when threads of one process (s3transfer's)
    report events. In the writer, ``kill_parent`` makes the kill take the trainer down
    first.
    """

    def __init__(self, events_path: str, kill_at: int | None, kill_parent: bool = False) -> None:
        self.kill_at = kill_at
        self.kill_parent = kill_parent
        self._path = events_path
        self._lock = threading.Lock()
        # Line-buffered, so every recorded name is in the file before a later kill.
        self._log = open(events_path, "a", buffering=1, encoding="utf-8")

    @property
    def count(self) -> int:
        with open(self._path, encoding="utf-8") as handle:
            return sum(1 for _line in handle)

    def __call__(self, name: str) -> None:
        with self._lock:
            if self.count == self.kill_at:
                self._log.write(f"KILL {name}\n")
                if self.kill_parent:
                    os.kill(os.getppid(), signal.SIGKILL)
                os.kill(os.getpid(), signal.SIGKILL)
            self._log.write(name + "\n")


# ---------------------------------------------------------------------------
# The training state: deterministic for a given step, so the test can rebuild it.


def build_training(seed: int = SEED) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU(), torch.nn.Linear(WIDTH, WIDTH)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    return model, optimizer


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    """Run optimizer step number ``step`` (1-based) on data derived from the step alone."""
    generator = torch.Generator().manual_seed(SEED + step)
    inputs = torch.randn(BATCH, WIDTH, generator=generator)
    targets = torch.randn(BATCH, WIDTH, generator=generator)
    optimizer.zero_grad()
    loss = torch.nn.functional.mse_loss(model(inputs), targets)
    loss.backward()
    optimizer.step()


def expected_state_sha256(step: int) -> tuple[str, str]:
    """Return the state-dict hashes of model and optimizer after ``step`` steps."""
    model, optimizer = build_training()
    for number in range(1, step + 1):
        train_step(model, optimizer, number)
    return ml.checkpoint.state_dict_sha256(model), optimizer_sha256(optimizer)


def optimizer_sha256(optimizer: torch.optim.Optimizer) -> str:
    state = optimizer.state_dict()["state"]
    flat = {f"{index}.{name}": value for index, entry in state.items() for name, value in entry.items()}
    return ml.checkpoint.state_dict_sha256(flat)


def make_s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name=REGION,
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def small_part_transfer_config():
    """Return a config that sends every file of more than one part as a multipart upload."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES,
                          max_concurrency=2)


# ---------------------------------------------------------------------------
# Instrumentation of the save path


class _CountingFile:
    """A binary file wrapper that reports an event before each MiB written."""

    def __init__(self, handle, name: str, on_event: Callable[[str], None]) -> None:
        self._handle = handle
        self._name = name
        self._on_event = on_event
        self._written = 0
        self._next_mark = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        offset = 0
        while offset < len(view):
            if self._written >= self._next_mark:
                self._on_event(f"write {self._name} {self._next_mark // MIB}")
                self._next_mark += MIB
            chunk = view[offset:offset + self._next_mark - self._written]
            self._handle.write(chunk)
            offset += len(chunk)
            self._written += len(chunk)
        return len(view)

    def __getattr__(self, attribute: str):
        return getattr(self._handle, attribute)

    def __enter__(self) -> "_CountingFile":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._handle.close()


def instrument_snapshot(on_event: Callable[[str], None]) -> None:
    """Report ``snapshot <n>`` before each tensor copy. It runs in the trainer process."""
    real_copy_tensor = ml.checkpoint._HostBuffers._copy_tensor
    snapshots = [0]

    def counting_copy_tensor(self, source, buffer):
        on_event(f"snapshot {snapshots[0]}")
        snapshots[0] += 1
        return real_copy_tensor(self, source, buffer)

    ml.checkpoint._HostBuffers._copy_tensor = counting_copy_tensor


def instrument_writer(on_event: Callable[[str], None]) -> None:
    """Report opens, writes, fsyncs and the manifest rename. It runs in the writer process."""
    real_open = builtins.open
    real_fsync = os.fsync
    real_replace = os.replace

    def counting_open(path, mode="r", *args, **kwargs):
        if "w" in mode:
            on_event(f"open {Path(path).name}")
        handle = real_open(path, mode, *args, **kwargs)
        if "w" in mode and "b" in mode:
            return _CountingFile(handle, Path(path).name, on_event)
        return handle

    def counting_fsync(descriptor: int) -> None:
        on_event("fsync before")
        real_fsync(descriptor)
        on_event("fsync after")

    def counting_replace(source, destination) -> None:
        on_event("rename before")
        real_replace(source, destination)
        on_event("rename after")

    # Module globals shadow the builtin open inside ml.checkpoint only.
    ml.checkpoint.open = counting_open
    contract.open = counting_open
    os.fsync = counting_fsync
    os.replace = counting_replace


def writer_main(socket_fd: int) -> None:
    """Instrument the writer process of a save child, then serve its saves."""
    kill_at = os.environ.get(ENV_KILL_AT, "")
    counter = EventCounter(os.environ[ENV_EVENTS_PATH], int(kill_at) if kill_at else None,
                           kill_parent=True)
    instrument_writer(counter)
    # Write at normal priority from the start: a background write that the trainer's
    # wait() stops and rewrites would make the event sequence depend on timing.
    ml.checkpoint.BACKGROUND_NICE = None
    ml.checkpoint._writer_main(socket_fd)


# ---------------------------------------------------------------------------
# Instrumentation of the upload path


def instrument_upload(s3, on_event: Callable[[str], None]) -> None:
    def remember_key(params, context, **_kwargs) -> None:
        # Only this hook sees the API parameters, so the key name goes into the context.
        context["kill_key_name"] = str(params.get("Key", "")).rsplit("/", 1)[-1]

    def before_call(model, context, **_kwargs) -> None:
        on_event(f"call {model.name} {context.get('kill_key_name', '')}")

    def after_call(model, context, **_kwargs) -> None:
        on_event(f"done {model.name} {context.get('kill_key_name', '')}")

    s3.meta.events.register("before-parameter-build.s3", remember_key)
    s3.meta.events.register("before-call.s3", before_call)
    s3.meta.events.register("after-call.s3", after_call)

    from s3transfer.utils import ReadFileChunk

    real_read = ReadFileChunk.read

    def counting_read(self, amount=None):
        # Every part is read from its own ReadFileChunk, from the start of the chunk.
        position = self.tell()
        if position % MIB == 0 and position < len(self):
            name = Path(_file_name(self._fileobj)).name
            on_event(f"body {name} {(self._start_byte + position) // MIB}")
        return real_read(self, amount)

    ReadFileChunk.read = counting_read


def _file_name(fileobj) -> str:
    # s3transfer wraps the file in readers (InterruptReader) that keep it as _fileobj.
    while not hasattr(fileobj, "name") and hasattr(fileobj, "_fileobj"):
        fileobj = fileobj._fileobj
    return str(getattr(fileobj, "name", "unknown"))


# ---------------------------------------------------------------------------
# Entry point


def run(config: ChildConfig) -> None:
    """Save or upload as ``config`` says; meant to run in a child process."""
    torch.set_num_threads(1)
    counter = EventCounter(config.events_path, config.kill_at)
    if config.mode == "save":
        run_saves(config, counter)
    elif config.mode == "upload":
        run_uploads(config, counter)
    else:
        raise ValueError(f"unknown child mode {config.mode!r}; expected save or upload")
    sys.stdout.flush()


def run_saves(config: ChildConfig, on_event: Callable[[str], None]) -> None:
    instrument_snapshot(on_event)
    os.environ[ENV_EVENTS_PATH] = config.events_path
    os.environ[ENV_KILL_AT] = "" if config.kill_at is None else str(config.kill_at)
    ml.checkpoint.WRITER_ENTRY = (__name__, "writer_main")
    model, optimizer = build_training()
    checkpointer = Checkpointer(config.checkpoint_dir, config.run_id, model, optimizer)
    step = 0
    for target in config.steps:
        while step < target:
            step += 1
            train_step(model, optimizer, step)
        checkpointer.save(step, epoch=0)
        checkpointer.wait()
    checkpointer.close()


def run_uploads(config: ChildConfig, on_event: Callable[[str], None]) -> None:
    from bootstrap.store import RunStore

    s3 = make_s3_client(config.endpoint)
    store = RunStore(s3, config.bucket, config.run_id, transfer_config=small_part_transfer_config())
    lease = store.try_acquire_lease(INSTANCE_ID, LEASE_STALE_AFTER_S)
    if lease is None:
        raise RuntimeError(f"the lease of run {config.run_id} is held by another instance")
    instrument_upload(s3, on_event)
    for step in config.steps:
        folder = Path(config.checkpoint_dir) / contract.step_folder_name(step)
        manifest = contract.read_verified_manifest(folder)
        if manifest is None:
            raise RuntimeError(f"local checkpoint {folder} does not verify")
        lease = store.upload_checkpoint(folder, manifest, lease)
        store.prune_checkpoints(config.keep_checkpoints)
