"""Checkpoints of the full PyTorch training state, written as ``ml.contract`` requires.

A checkpoint is a folder ``CHECKPOINT_DIR/step-NNNNNNNN/`` with these files:

* ``model.pt``: the model ``state_dict``.
* ``optimizer.pt``: the optimizer ``state_dict``.
* ``trainer.pt``: step, epoch, sampler position, run id, LR scheduler and GradScaler
  state, the RNG states (Python ``random``, torch CPU, CUDA when available, NumPy when
  the process imported it) and caller-defined extra values.
* ``signature.json``: name, shape and dtype of every model parameter and buffer.
* ``manifest.json``: written last by ``ml.contract.write_manifest``, which commits it.

``Checkpointer.save`` blocks the training loop only while it copies the state into
shared host memory. A writer process, started by the first save, serializes the copy,
hashes and fsyncs the files and writes the manifest. It writes at low priority until
the trainer waits for the save, and it dies with the trainer. A typical loop::

    signals = TrainingSignals().install()
    checkpointer = Checkpointer(checkpoint_dir, run_id, model, optimizer, scheduler)
    if resume_from:
        state = checkpointer.load(resume_from)
    ...
    if signals.should_save_and_exit():
        checkpointer.save(step, epoch, position)
        checkpointer.close()
        sys.exit(contract.EXIT_SAVED)
"""

from __future__ import annotations

import concurrent.futures
import copy
import ctypes
import hashlib
import io
import json
import logging
import math
import mmap
import multiprocessing.connection
import os
import pickle
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ml import contract

logger = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_FILE = "trainer.pt"
SIGNATURE_FILE = "signature.json"
TRAINER_FORMAT = 1

MISMATCH_FIX = (
    "Resume this checkpoint only with the model and run it was saved from, or start a "
    "new run by changing run_name in the context section of cdk.json, so that the old "
    "checkpoints are not used."
)


class CheckpointError(Exception):
    """Base class of the errors raised by this module."""


class CheckpointNotFoundError(CheckpointError):
    """No committed checkpoint exists at the given path."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint folder has no manifest, or a file differs from its manifest."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint belongs to another run or to a model with other parameters."""


class CheckpointSaveError(CheckpointError):
    """A background save failed, so its folder has no manifest."""


# ---------------------------------------------------------------------------
# Model signature and weight hashes


def _as_state_dict(model_or_state_dict: torch.nn.Module | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(model_or_state_dict, torch.nn.Module):
        return model_or_state_dict.state_dict()
    return model_or_state_dict


def signature_entries(model_or_state_dict: torch.nn.Module | Mapping[str, Any]) -> list[dict]:
    """Return name, shape and dtype of each tensor in the state dict, sorted by name."""
    state = _as_state_dict(model_or_state_dict)
    entries = []
    for name in sorted(state):
        value = state[name]
        if isinstance(value, torch.Tensor):
            entries.append({"name": name, "shape": list(value.shape), "dtype": str(value.dtype)})
    return entries


def model_signature(model_or_state_dict: torch.nn.Module | Mapping[str, Any]) -> str:
    """Return the SHA-256 of the sorted parameter and buffer names, shapes and dtypes."""
    return model_signature_from_entries(signature_entries(model_or_state_dict))


def model_signature_from_entries(entries: list[dict]) -> str:
    """Return the signature hash of entries from ``signature_entries``."""
    text = json.dumps(entries, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    """Return the raw bytes of a tensor in native byte order, row-major."""
    host = tensor.detach().to("cpu").contiguous()
    size = host.numel() * host.element_size()
    if size == 0:
        return b""
    # The bytes are copied out before ``host`` can be freed, and ``data_ptr`` already
    # includes the storage offset of a view.
    return ctypes.string_at(host.data_ptr(), size)


def state_dict_sha256(model_or_state_dict: torch.nn.Module | Mapping[str, Any]) -> str:
    """Return a SHA-256 over the tensors of a state dict, in sorted key order.

    Each tensor contributes its name, dtype, shape and raw bytes, so the hash is stable
    across processes on machines with the same byte order. Non-tensor entries (extra
    state of custom modules) are not hashed.
    """
    state = _as_state_dict(model_or_state_dict)
    digest = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        if not isinstance(value, torch.Tensor):
            continue
        data = _tensor_bytes(value)
        header = json.dumps([name, str(value.dtype), list(value.shape), len(data)])
        digest.update(header.encode("utf-8") + b"\n")
        digest.update(data)
    return digest.hexdigest()


def _describe_shape(shape: list[int]) -> str:
    return "(" + ", ".join(str(size) for size in shape) + ("," if len(shape) == 1 else "") + ")"


def describe_signature_differences(
    saved: list[dict], current: list[dict], model: torch.nn.Module | None = None, limit: int = 3
) -> str:
    """Return a sentence naming the first ``limit`` tensors that differ, or "" if none do."""
    parameter_names = {name for name, _ in model.named_parameters()} if model is not None else None

    def kind(name: str) -> str:
        if parameter_names is None:
            return "tensor"
        return "parameter" if name in parameter_names else "buffer"

    saved_by_name = {entry["name"]: entry for entry in saved}
    current_by_name = {entry["name"]: entry for entry in current}
    differences = []
    for name in sorted(saved_by_name.keys() | current_by_name.keys()):
        old = saved_by_name.get(name)
        new = current_by_name.get(name)
        if new is None:
            differences.append(f"{kind(name)} {name} is in the checkpoint but not in the model")
        elif old is None:
            differences.append(f"{kind(name)} {name} is in the model but not in the checkpoint")
        elif old["shape"] != new["shape"]:
            differences.append(
                f"{kind(name)} {name} has shape {_describe_shape(old['shape'])} in the checkpoint "
                f"but {_describe_shape(new['shape'])} in the model"
            )
        elif old["dtype"] != new["dtype"]:
            differences.append(
                f"{kind(name)} {name} has dtype {old['dtype']} in the checkpoint "
                f"but {new['dtype']} in the model"
            )
    if not differences:
        return ""
    text = "; ".join(differences[:limit])
    if len(differences) > limit:
        text += f"; and {len(differences) - limit} more differences"
    return text


# ---------------------------------------------------------------------------
# RNG states


def capture_rng_states() -> dict[str, Any]:
    """Return the states of the Python, torch CPU, CUDA and (if imported) NumPy RNGs."""
    states: dict[str, Any] = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    # A process that never imported NumPy has not drawn from its global RNG, so there
    # is nothing to save, and importing it here would only cost start-up time.
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        name, keys, position, has_gauss, cached_gaussian = numpy.random.get_state(legacy=True)
        # Plain ints keep the file loadable with ``torch.load(weights_only=True)``.
        states["numpy"] = (name, [int(key) for key in keys], int(position), int(has_gauss), float(cached_gaussian))
    return states


def restore_rng_states(states: Mapping[str, Any]) -> None:
    """Restore RNG states returned by ``capture_rng_states``."""
    random.setstate(_as_python_random_state(states["python"]))
    torch.set_rng_state(states["torch"])
    cuda_states = states.get("cuda")
    if cuda_states is not None:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda_states):
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning(
                "checkpoint has CUDA RNG states for %d devices but this process has %d, so they "
                "were not restored and CUDA random numbers will differ from the saved run",
                len(cuda_states),
                torch.cuda.device_count() if torch.cuda.is_available() else 0,
            )
    numpy_state = states.get("numpy")
    if numpy_state is not None:
        try:
            import numpy
        except ImportError:
            logger.warning("checkpoint has a NumPy RNG state, but NumPy is not installed, so it was not restored")
            return
        # NOTE: this path is not covered by the tests, which run without NumPy.
        name, keys, position, has_gauss, cached_gaussian = numpy_state
        numpy.random.set_state((name, numpy.array(keys, dtype=numpy.uint32), position, has_gauss, cached_gaussian))


def _as_python_random_state(state: Any) -> tuple:
    # random.setstate needs tuples, while some serializers return lists.
    version, internal, gauss_next = state
    return (version, tuple(internal), gauss_next)


# ---------------------------------------------------------------------------
# Host copies of the training state

# Offset alignment of each tensor in the shared host segment, in bytes.
SEGMENT_ALIGNMENT = 64


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r}")
    return dtype


def _segment_offsets(layout: tuple[tuple[tuple[int, ...], str], ...]) -> tuple[list[int], int]:
    """Return the byte offset of each (shape, dtype name) in a segment, and its size."""
    offsets = []
    size = 0
    for shape, dtype_name in layout:
        offsets.append(size)
        nbytes = math.prod(shape) * _dtype_from_name(dtype_name).itemsize
        size += -(-nbytes // SEGMENT_ALIGNMENT) * SEGMENT_ALIGNMENT
    return offsets, size


def _segment_tensors(mapping: mmap.mmap, layout: tuple[tuple[tuple[int, ...], str], ...]) -> list[torch.Tensor]:
    """Return one tensor per layout entry, each a view of its own bytes in ``mapping``.

    Each view has its own storage, so ``torch.save`` writes only that tensor's bytes.
    """
    offsets, _size = _segment_offsets(layout)
    tensors = []
    for (shape, dtype_name), offset in zip(layout, offsets):
        dtype = _dtype_from_name(dtype_name)
        count = math.prod(shape)
        if count == 0:
            tensors.append(torch.empty(shape, dtype=dtype))
            continue
        raw = torch.frombuffer(mapping, dtype=torch.uint8, count=count * dtype.itemsize, offset=offset)
        tensors.append(raw.view(dtype).view(shape))
    return tensors


class _SharedSegment:
    """Anonymous shared memory (a memfd) that contains the host copies of one state layout.

    The writer process maps the same memfd, so it reads the copies without a transfer.
    """

    def __init__(self, layout: tuple[tuple[tuple[int, ...], str], ...]) -> None:
        self.layout = layout
        _offsets, size = _segment_offsets(layout)
        self.fd = os.memfd_create("spotrun-checkpoint", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, max(size, 1))
        self._mapping = mmap.mmap(self.fd, max(size, 1))
        self.tensors = _segment_tensors(self._mapping, layout)

    def close(self) -> None:
        """Close the memfd. The mapping stays valid while tensors refer to it."""
        os.close(self.fd)


class _HostBuffers:
    """Host copies of state tensors in a shared segment, reused while the layout is the same.

    A snapshot whose tensor names, shapes or dtypes differ from the last one gets a new
    segment. A caller must not start a new snapshot while the writer still reads the
    previous one, because the buffers are overwritten in place.

    NOTE: copies from CUDA tensors are synchronous, because the shared segment is not
    pinned memory. The CUDA path has not been run, because the tests run on the CPU only.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}
        self.segment: _SharedSegment | None = None

    def snapshot(self, value: Any) -> tuple[Any, bool]:
        """Return a copy of ``value`` whose tensors live in the shared segment.

        The second value is True when this snapshot allocated a new segment.
        """
        sources: list[tuple[tuple, torch.Tensor]] = []
        template = self._collect(value, (), sources)
        layout = tuple((tuple(tensor.shape), str(tensor.dtype)) for _path, tensor in sources)
        paths = [path for path, _tensor in sources]
        new_segment = self.segment is None or self.segment.layout != layout or list(self._buffers) != paths
        if new_segment:
            if self.segment is not None:
                self.segment.close()
            self.segment = _SharedSegment(layout)
            self._buffers = dict(zip(paths, self.segment.tensors))
        for path, tensor in sources:
            self._copy_tensor(tensor.detach(), self._buffers[path])
        return self._fill(template), new_segment

    def _collect(self, value: Any, path: tuple, sources: list) -> Any:
        """Return ``value`` with each tensor replaced by its path, appending it to ``sources``."""
        if isinstance(value, torch.Tensor):
            sources.append((path, value))
            return _TensorPath(path)
        if isinstance(value, dict):
            items = {key: self._collect(item, path + (key,), sources) for key, item in value.items()}
            # Keep OrderedDict and collections.Counter (used by MultiStepLR) as they are.
            return items if type(value) is dict else type(value)(items)
        if isinstance(value, (list, tuple)):
            items = [self._collect(item, path + (index,), sources) for index, item in enumerate(value)]
            return items if type(value) is list else tuple(items)
        return copy.deepcopy(value)

    def _fill(self, template: Any) -> Any:
        if isinstance(template, _TensorPath):
            return self._buffers[template.path]
        if isinstance(template, dict):
            items = {key: self._fill(item) for key, item in template.items()}
            return items if type(template) is dict else type(template)(items)
        if isinstance(template, (list, tuple)):
            items = [self._fill(item) for item in template]
            return items if type(template) is list else tuple(items)
        return template

    def _copy_tensor(self, source: torch.Tensor, buffer: torch.Tensor) -> None:
        buffer.copy_(source)


@dataclass(frozen=True)
class _TensorPath:
    path: tuple


class _BufferPickler(pickle.Pickler):
    """Pickler that writes each tensor of the shared segment as its index, and other values as usual."""

    def __init__(self, file: io.BytesIO, indices: dict[int, int]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._indices = indices

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            index = self._indices.get(id(obj))
            if index is not None:
                return ("segment", index)
        return None


class _BufferUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, tensors: list[torch.Tensor]) -> None:
        super().__init__(file)
        self._tensors = tensors

    def persistent_load(self, pid: Any) -> Any:
        kind, index = pid
        if kind != "segment":
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        return self._tensors[index]


# ---------------------------------------------------------------------------
# Saving


@dataclass(frozen=True)
class SaveResult:
    """Outcome of one committed save."""

    folder: Path
    step: int
    epoch: int
    total_bytes: int
    blocked_seconds: float  # time the training loop waited for the host copy
    write_seconds: float  # time the writer process took to serialize, fsync and commit
    skipped: bool = False  # True when the folder already held this step's checkpoint


@dataclass(frozen=True)
class ResumeState:
    """Training position restored by ``load``."""

    folder: Path
    run_id: str
    step: int
    epoch: int
    position: int  # samples of ``epoch`` already consumed
    extra: dict = field(default_factory=dict)


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# Bytes per write call of a checkpoint file. A background write checks for "hurry"
# before each call (see _WriterThreads).
WRITE_CHUNK_BYTES = 4 << 20
# Nice value of the writer's background thread (19 is the lowest priority), or None to
# save at normal priority from the start. Unlike the SCHED_IDLE policy, nice 19 still
# makes progress when other processes keep the CPU busy.
BACKGROUND_NICE: int | None = 19


class _Hurried(Exception):
    """Signal that stops a background file write, because the trainer waits and the file is rewritten."""


class _HashingWriter:
    """A binary file wrapper that computes the SHA-256 and size of what is written.

    ``before_write`` runs before each chunk, and may raise to stop the write. With a
    ``hasher`` thread, each chunk is hashed there while this thread writes it, and
    ``write`` returns after both, so the caller's buffer stays valid for the hash.
    """

    def __init__(
        self,
        handle: Any,
        before_write: Callable[[], None] | None = None,
        hasher: concurrent.futures.Executor | None = None,
    ) -> None:
        self._handle = handle
        self._before_write = before_write
        self._hasher = hasher
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        for offset in range(0, len(view), WRITE_CHUNK_BYTES):
            if self._before_write is not None:
                self._before_write()
            chunk = view[offset:offset + WRITE_CHUNK_BYTES]
            if self._hasher is None:
                self._digest.update(chunk)
                self._handle.write(chunk)
                continue
            # hashlib and file writes release the GIL, so the two run in parallel.
            hashed = self._hasher.submit(self._digest.update, chunk)
            try:
                self._handle.write(chunk)
            finally:
                hashed.result()
        self.size += len(view)
        return len(view)

    def flush(self) -> None:
        self._handle.flush()

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def _write_file(
    path: Path,
    payload: Any,
    before_write: Callable[[], None] | None = None,
    hasher: concurrent.futures.Executor | None = None,
) -> contract.ManifestFile:
    """Write one checkpoint file, hashing it in the same pass, and fsync it."""
    with open(path, "wb") as handle:
        writer = _HashingWriter(handle, before_write, hasher)
        if path.suffix == ".json":
            writer.write(json.dumps(payload, indent=1).encode("utf-8"))
        else:
            torch.save(payload, writer)
        handle.flush()
        os.fsync(handle.fileno())
    return contract.ManifestFile(path.name, writer.size, writer.hexdigest())


def _write_checkpoint(
    request: dict,
    tensors: list[torch.Tensor],
    on_file: Callable[[contract.ManifestFile], None],
    write_file: Callable[[Path, Any], contract.ManifestFile] | None = None,
) -> int:
    """Write the files of one save request, then commit its manifest; return the bytes written."""
    folder = Path(request["folder"])
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    if created:
        _fsync_directory(folder.parent)
    stale_manifest = folder / contract.MANIFEST_NAME
    if stale_manifest.exists():
        # The manifest did not verify (checked in save), so the folder is a torn
        # checkpoint of this step. Remove the commit before the files change.
        stale_manifest.unlink()
        _fsync_directory(folder)

    manifest_files = []
    for name, pickled, pickle_error in request["files"]:
        if pickle_error is not None:
            raise CheckpointSaveError(f"the state of {name} cannot be pickled: {pickle_error}")
        payload = _BufferUnpickler(io.BytesIO(pickled), tensors).load()
        item = write_file(folder / name, payload) if write_file is not None else _write_file(folder / name, payload)
        manifest_files.append(item)
        on_file(item)

    manifest = contract.Manifest(
        run_id=request["run_id"],
        step=request["step"],
        epoch=request["epoch"],
        files=tuple(manifest_files),
        signature=request["signature"],
        created_at=time.time(),
    )
    contract.write_manifest(folder, manifest)
    return sum(item.size for item in manifest_files)


def _lower_thread_priority() -> None:
    # On Linux the nice value belongs to the thread, so this leaves the others alone.
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)


class _WriterThreads:
    """Threads of the writer process, which write checkpoint files at low priority until the trainer waits.

    A save runs on a coordinator thread of normal priority, which hands each file to a
    background thread at nice BACKGROUND_NICE, so the save takes little CPU time from
    training. When the trainer waits for the save it sends "hurry": the background
    write stops at its next chunk, and the coordinator writes that file again from the
    start, and the files after it, at normal priority. An unprivileged thread cannot
    raise its own priority again, hence the rewrite on another thread.
    """

    def __init__(self, connection: multiprocessing.connection.Connection) -> None:
        self.connection = connection
        self.hurry = threading.Event()
        self.coordinator = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="checkpoint-coordinator"
        )
        self.hasher = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-hasher")
        self.background = None
        self.background_hasher = None
        if BACKGROUND_NICE is not None:
            self.background = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="checkpoint-background", initializer=_lower_thread_priority
            )
            self.background_hasher = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="checkpoint-background-hasher", initializer=_lower_thread_priority
            )

    def start_save(self, request: dict, tensors: list[torch.Tensor]) -> None:
        self.hurry.clear()
        self.coordinator.submit(self._save, request, tensors)

    def _raise_if_hurried(self) -> None:
        if self.hurry.is_set():
            raise _Hurried()

    def _write_file(self, path: Path, payload: Any) -> contract.ManifestFile:
        if self.background is not None and not self.hurry.is_set():
            try:
                return self.background.submit(
                    _write_file, path, payload, self._raise_if_hurried, self.background_hasher
                ).result()
            except Exception:
                # torch.save reports the _Hurried raised in its write callback as a
                # RuntimeError. A real error fails again in the rewrite below.
                if not self.hurry.is_set():
                    raise
        return _write_file(path, payload, None, self.hasher)

    def _save(self, request: dict, tensors: list[torch.Tensor]) -> None:
        started = time.monotonic()
        try:
            total_bytes = _write_checkpoint(
                request, tensors, lambda item: self.connection.send(("file", item)), self._write_file
            )
        except Exception as error:  # noqa: BLE001 - sent to the trainer, which raises it
            text = str(error) if isinstance(error, CheckpointSaveError) else f"{type(error).__name__}: {error}"
            self.connection.send(("error", text))
            return
        self.connection.send(("done", total_bytes, time.monotonic() - started))


# The writer process runs this module's _writer_main. Tests replace it with a function
# that instruments the writer first.
WRITER_ENTRY = ("ml.checkpoint", "_writer_main")

# Runs first in the writer process, with the standard library only. It makes the kernel
# send SIGKILL to the writer when the thread that started it exits (prctl
# PR_SET_PDEATHSIG), and exits if that parent is already gone. It imports torch and the
# entry point on a thread of low priority, so the main thread keeps normal priority for
# the threads it starts later.
_WRITER_BOOTSTRAP = """
import ctypes, importlib, json, os, signal, sys, threading
PR_SET_PDEATHSIG = 1
ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
if os.getppid() != int(sys.argv[1]):
    sys.exit(0)
sys.path[:0] = json.loads(sys.argv[3])
module_name, function_name = sys.argv[4], sys.argv[5]
modules = []

def import_entry_module():
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), int(sys.argv[6]))
    modules.append(importlib.import_module(module_name))

importer = threading.Thread(target=import_entry_module)
importer.start()
importer.join()
getattr(modules[0], function_name)(int(sys.argv[2]))
"""


def _writer_main(socket_fd: int) -> None:
    """Serve save requests from the trainer on ``socket_fd`` until it closes."""
    # The manifest's SHA-256 covers every file, so the zip records need no CRC-32 of
    # their own. torch.load still reads such files (torch.serialization.set_crc32_options).
    torch.serialization.set_crc32_options(False)
    channel = socket.socket(fileno=socket_fd)
    connection = multiprocessing.connection.Connection(os.dup(socket_fd))
    threads = _WriterThreads(connection)
    tensors: list[torch.Tensor] = []
    while True:
        try:
            message = connection.recv()
        except EOFError:
            return
        kind = message[0]
        if kind == "segment":
            _message, fds, _flags, _address = socket.recv_fds(channel, 1, 1)
            mapping = mmap.mmap(fds[0], max(_segment_offsets(message[1])[1], 1))
            os.close(fds[0])
            tensors = _segment_tensors(mapping, message[1])
        elif kind == "save":
            threads.start_save(message[1], tensors)
        elif kind == "hurry":
            threads.hurry.set()
        elif kind == "exit":
            return


class _WriterProcess:
    """The persistent process that serializes, hashes, fsyncs and commits checkpoints.

    Training threads and the writer do not share a GIL, and the writer saves at low
    priority until the trainer waits for it (_WriterThreads). It dies with the thread
    that started it (PR_SET_PDEATHSIG), and exits when the socket closes.

    NOTE: when the first save runs on a thread that exits before the trainer does, the
    writer dies with that thread. A save in flight then fails, and the next save starts
    a new writer.
    """

    def __init__(self) -> None:
        parent_socket, child_socket = socket.socketpair()
        module_name, function_name = WRITER_ENTRY
        try:
            self.process = subprocess.Popen(
                [
                    sys.executable, "-c", _WRITER_BOOTSTRAP, str(os.getpid()), str(child_socket.fileno()),
                    json.dumps(sys.path), module_name, function_name, str(BACKGROUND_NICE or 0),
                ],
                pass_fds=(child_socket.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        finally:
            child_socket.close()
        self._socket = parent_socket
        self.connection = multiprocessing.connection.Connection(os.dup(parent_socket.fileno()))
        self.segment: _SharedSegment | None = None

    def alive(self) -> bool:
        return self.process.poll() is None

    def send_segment(self, segment: _SharedSegment) -> None:
        self.connection.send(("segment", segment.layout))
        socket.send_fds(self._socket, [b"\0"], [segment.fd])
        self.segment = segment

    def hurry(self) -> None:
        """Ask the writer to finish the save in flight at normal priority."""
        try:
            self.connection.send(("hurry",))
        except OSError:
            pass  # the writer has exited, which the receiver thread reports

    def exit_code(self, timeout: float = 5.0) -> int | None:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self, timeout: float = 10.0) -> None:
        """Ask the writer to exit, and kill it when it has not exited within ``timeout`` seconds."""
        try:
            self.connection.send(("exit",))
        except OSError:
            pass  # the writer has already exited
        self.connection.close()
        self._socket.close()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.error("checkpoint writer process %d did not exit within %.0f s; killing it",
                         self.process.pid, timeout)
            self.process.kill()
            self.process.wait()


class Checkpointer:
    """Saves the training state asynchronously into step folders and loads it back.

    ``save`` copies the state into shared memory, and a writer process (started by the
    first save) serializes, hashes, fsyncs and commits it. At most one save is in
    flight: ``save`` first waits for the previous one. A failed save leaves its folder
    without a manifest, and the next ``save``, ``wait`` or ``close`` raises
    ``CheckpointSaveError``.

    ``on_file_written``, when given, is called from a background thread with the path
    and ``contract.ManifestFile`` of each file once it is written and fsynced, before
    the manifest commits the folder. An exception it raises fails the save.
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike,
        run_id: str,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
        scaler: Any | None = None,
        *,
        on_file_written: Callable[[Path, contract.ManifestFile], None] | None = None,
    ) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.run_id = run_id
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.on_file_written = on_file_written
        self._buffers = _HostBuffers()
        self._writer: _WriterProcess | None = None
        self._thread: threading.Thread | None = None
        self._result: SaveResult | None = None
        self._error: BaseException | None = None
        self._failed_folder: Path | None = None
        self._last_committed_step: int | None = None
        self._closed = False

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def save(self, step: int, epoch: int, position: int = 0, extra: Mapping[str, Any] | None = None) -> Path:
        """Start saving the state after ``step`` optimizer steps and return its folder.

        Blocks until the previous save is committed and the state is copied into host
        memory. ``position`` is the number of samples of ``epoch`` already consumed.
        ``extra`` contains values that ``torch.load(weights_only=True)`` can read back
        (tensors, numbers, strings, lists, dicts). Saving a step that is already
        committed in the folder by the same run does nothing.
        """
        if self._closed:
            raise CheckpointError("save() called after close()")
        self.wait()
        folder = self.checkpoint_dir / contract.step_folder_name(step)
        if self._already_committed(folder, step):
            self._result = SaveResult(folder, step, epoch, 0, 0.0, 0.0, skipped=True)
            return folder

        started = time.monotonic()
        files, new_segment = self._capture(step, epoch, position, extra)
        blocked_seconds = time.monotonic() - started

        request = {
            "folder": str(folder),
            "run_id": self.run_id,
            "step": step,
            "epoch": epoch,
            "signature": model_signature_from_entries(files[SIGNATURE_FILE]),
            "files": self._pickle_files(files),
        }
        if self._writer is None or not self._writer.alive():
            self._start_writer()
            new_segment = True
        try:
            self._send_request(request, new_segment)
        except OSError as error:
            # The writer exited after the check above; a new one gets the whole request.
            logger.warning("checkpoint writer process exited (%s); starting a new one", error)
            self._start_writer()
            self._send_request(request, new_segment=True)

        self._thread = threading.Thread(
            target=self._receive,
            args=(self._writer, folder, step, epoch, blocked_seconds),
            name=f"checkpoint-receiver-{step}",
            # Not a daemon, so the interpreter lets a save in flight finish at exit.
            daemon=False,
        )
        self._thread.start()
        return folder

    def wait(self) -> SaveResult | None:
        """Wait for the save in flight and return the last result, or None if none ran.

        Raises ``CheckpointSaveError`` once for a save that failed.
        """
        if self._thread is not None:
            if self._thread.is_alive():
                self._writer.hurry()
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, folder = self._error, self._failed_folder
            self._error = None
            raise CheckpointSaveError(f"checkpoint save into {folder} failed: {error}") from error
        return self._result

    def close(self) -> SaveResult | None:
        """Wait for the save in flight, stop the writer process and make later saves raise."""
        try:
            return self.wait()
        finally:
            self._closed = True
            if self._writer is not None:
                self._writer.close()
                self._writer = None

    def load(self, path: str | os.PathLike, restore_rng: bool = True) -> ResumeState:
        """Restore the state from a checkpoint folder or the newest one in a directory."""
        self.wait()
        state = load(
            path,
            self.model,
            self.optimizer,
            self.scheduler,
            self.scaler,
            run_id=self.run_id,
            restore_rng=restore_rng,
        )
        same_directory = state.folder.parent.resolve() == self.checkpoint_dir.resolve()
        self._last_committed_step = state.step if same_directory else None
        return state

    @property
    def writer_pid(self) -> int | None:
        """Process id of the writer process, or None before the first save and after close."""
        return self._writer.process.pid if self._writer is not None else None

    def _send_request(self, request: dict, new_segment: bool) -> None:
        if new_segment:
            self._writer.send_segment(self._buffers.segment)
        self._writer.connection.send(("save", request))

    def _start_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer = _WriterProcess()

    def _already_committed(self, folder: Path, step: int) -> bool:
        if self._last_committed_step == step:
            return True
        manifest = contract.read_verified_manifest(folder)
        if manifest is None:
            return False
        if manifest.run_id != self.run_id:
            raise CheckpointSaveError(
                f"{folder} already contains a checkpoint of run {manifest.run_id!r}, not of run "
                f"{self.run_id!r}. Give each run its own checkpoint directory."
            )
        logger.info("checkpoint for step %d is already committed in %s, so it is not saved again", step, folder)
        self._last_committed_step = step
        return True

    def _capture(
        self, step: int, epoch: int, position: int, extra: Mapping[str, Any] | None
    ) -> tuple[dict[str, Any], bool]:
        trainer_state = {
            "format": TRAINER_FORMAT,
            "run_id": self.run_id,
            "step": step,
            "epoch": epoch,
            "position": position,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": capture_rng_states(),
            "extra": dict(extra or {}),
        }
        state = {
            MODEL_FILE: self.model.state_dict(),
            OPTIMIZER_FILE: self.optimizer.state_dict() if self.optimizer is not None else None,
            TRAINER_FILE: trainer_state,
        }
        files, new_segment = self._buffers.snapshot(state)
        files[SIGNATURE_FILE] = signature_entries(self.model)
        return files, new_segment

    def _pickle_files(self, files: dict[str, Any]) -> list[tuple[str, bytes | None, str | None]]:
        """Return (name, pickled payload, error) per file; segment tensors are pickled as indices.

        A payload that cannot be pickled gets an error, which the writer raises when it
        reaches that file, so the files before it are written as they would be in-process.
        """
        indices = {id(tensor): index for index, tensor in enumerate(self._buffers.segment.tensors)}
        pickled_files = []
        for name, payload in files.items():
            data = io.BytesIO()
            try:
                _BufferPickler(data, indices).dump(payload)
            except (pickle.PicklingError, TypeError, AttributeError) as error:
                pickled_files.append((name, None, f"{type(error).__name__}: {error}"))
                continue
            pickled_files.append((name, data.getvalue(), None))
        return pickled_files

    def _receive(self, writer: _WriterProcess, folder: Path, step: int, epoch: int, blocked_seconds: float) -> None:
        """Read the writer's messages for one save until it commits or fails."""
        try:
            while True:
                try:
                    message = writer.connection.recv()
                except (EOFError, OSError) as error:
                    code = writer.exit_code()
                    raise CheckpointSaveError(
                        f"the checkpoint writer process {writer.process.pid} exited with code {code} "
                        "during the save; the next save starts a new one"
                    ) from error
                kind = message[0]
                if kind == "file":
                    if self.on_file_written is not None:
                        self.on_file_written(folder / message[1].name, message[1])
                elif kind == "error":
                    raise CheckpointSaveError(message[1])
                elif kind == "done":
                    total_bytes, write_seconds = message[1], message[2]
                    break
        except BaseException as error:  # noqa: BLE001 - reported to the training loop by wait()
            logger.error("checkpoint save for step %d into %s failed: %s", step, folder, error)
            self._error = error
            self._failed_folder = folder
            return

        self._result = SaveResult(folder, step, epoch, total_bytes, blocked_seconds, write_seconds)
        self._last_committed_step = step
        logger.info(
            "checkpoint committed: step %d in %s (%.1f MB; training blocked %.1f ms, written in %.1f ms)",
            step,
            folder,
            total_bytes / 1e6,
            blocked_seconds * 1e3,
            write_seconds * 1e3,
        )


# ---------------------------------------------------------------------------
# Loading


def find_latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """Return the newest step folder whose manifest and files verify, or None.

    Folders without a manifest, or with a file that is missing, truncated or differs
    in SHA-256, are skipped with a warning.
    """
    for _step, folder in reversed(contract.committed_local_checkpoints(Path(checkpoint_dir))):
        if contract.read_verified_manifest(folder) is not None:
            return folder
        logger.warning("skipping checkpoint %s: its files do not match its manifest", folder)
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Return the step folder named by ``path``, or the newest verified one inside it.

    Raises ``CheckpointNotFoundError`` when there is none.
    """
    return _resolve_checkpoint(path)[0]


def _resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, bool]:
    """Return the step folder for ``path`` and whether its file hashes were just verified."""
    path = Path(path)
    if contract.parse_step_folder(path.name) is not None:
        if not path.is_dir():
            raise CheckpointNotFoundError(f"checkpoint folder not found: {path}")
        return path, False
    if not path.is_dir():
        raise CheckpointNotFoundError(f"checkpoint directory not found: {path}")
    latest = find_latest_checkpoint(path)
    if latest is None:
        raise CheckpointNotFoundError(f"no committed checkpoint with a valid manifest in {path}")
    return latest, True


def _torch_load(path: Path) -> Any:
    with open(path, "rb") as handle:
        return torch.load(handle, map_location="cpu", weights_only=True)


def load(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    *,
    run_id: str | None = None,
    restore_rng: bool = True,
) -> ResumeState:
    """Restore model, optimizer, scheduler, scaler and RNG states from a checkpoint.

    ``path`` is a step folder or a directory of them, in which case the newest verified
    one is used. The manifest and the file hashes are verified before anything is
    restored. Raises
    ``CheckpointCorruptError`` for a folder that does not verify, and
    ``CheckpointMismatchError`` when ``run_id`` (if given) or the model's parameter
    names, shapes or dtypes differ from the checkpoint. These checks run before
    anything is restored.
    """
    folder, hashes_verified = _resolve_checkpoint(path)
    manifest = contract.read_verified_manifest(folder, check_hashes=False)
    corrupt_message = (
        f"checkpoint {folder} is incomplete or damaged: its manifest is missing or "
        "invalid, or a file is missing or differs in size or SHA-256; resume from "
        "an older checkpoint or start from scratch"
    )
    if manifest is None:
        raise CheckpointCorruptError(corrupt_message)

    # The files are hashed in threads (hashlib releases the GIL) while torch.load reads
    # them, and nothing is restored before every hash matches the manifest. A folder
    # that find_latest_checkpoint has just verified is not hashed again.
    to_hash = () if hashes_verified else manifest.files
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(to_hash))) as pool:
        hashes = {item.name: pool.submit(contract.sha256_file, folder / item.name) for item in to_hash}
        try:
            trainer_state = _torch_load(folder / TRAINER_FILE)
            optimizer_state = _torch_load(folder / OPTIMIZER_FILE)
            model_state = _torch_load(folder / MODEL_FILE)
            load_error = None
        except Exception as error:  # noqa: BLE001 - raised below unless a hash explains it
            load_error = error
        damaged = [item.name for item in to_hash if hashes[item.name].result() != item.sha256]
    if damaged:
        raise CheckpointCorruptError(f"{corrupt_message} (damaged: {', '.join(damaged)})")
    if load_error is not None:
        raise load_error

    if run_id is not None and manifest.run_id != run_id:
        raise CheckpointMismatchError(
            f"checkpoint {folder} belongs to run {manifest.run_id!r} but this process runs "
            f"{run_id!r}. {MISMATCH_FIX}"
        )

    saved_entries = json.loads((folder / SIGNATURE_FILE).read_text(encoding="utf-8"))
    current_entries = signature_entries(model)
    if manifest.signature != model_signature_from_entries(current_entries):
        details = describe_signature_differences(saved_entries, current_entries, model)
        if not details:
            details = "the model signature differs from the one in the manifest"
        raise CheckpointMismatchError(f"checkpoint {folder} does not match the model: {details}. {MISMATCH_FIX}")

    if trainer_state.get("format") != TRAINER_FORMAT:
        raise CheckpointCorruptError(
            f"checkpoint {folder} has trainer state format {trainer_state.get('format')!r}, "
            f"expected {TRAINER_FORMAT}"
        )
    for name, target, saved in (
        ("optimizer", optimizer, optimizer_state),
        ("scheduler", scheduler, trainer_state["scheduler"]),
        ("scaler", scaler, trainer_state["scaler"]),
    ):
        if target is not None and saved is None:
            raise CheckpointMismatchError(
                f"checkpoint {folder} has no {name} state but a {name} was given. {MISMATCH_FIX}"
            )
        if target is None and saved is not None:
            logger.warning("checkpoint %s has %s state that is not restored: no %s was given", folder, name, name)

    model.load_state_dict(model_state)
    if optimizer is not None:
        optimizer.load_state_dict(optimizer_state)
    if scheduler is not None:
        scheduler.load_state_dict(trainer_state["scheduler"])
    if scaler is not None:
        scaler.load_state_dict(trainer_state["scaler"])
    if restore_rng:
        restore_rng_states(trainer_state["rng"])

    return ResumeState(
        folder=folder,
        run_id=manifest.run_id,
        step=int(trainer_state["step"]),
        epoch=int(trainer_state["epoch"]),
        position=int(trainer_state["position"]),
        extra=dict(trainer_state["extra"]),
    )


# ---------------------------------------------------------------------------
# Sampler


def epoch_seed(seed: int, epoch: int) -> int:
    """Return a 63-bit generator seed derived from (seed, epoch) with SHA-256."""
    digest = hashlib.sha256(f"{seed}:{epoch}".encode("ascii")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class DeterministicSampler(torch.utils.data.Sampler[int]):
    """Sample indices in a per-epoch permutation seeded with (seed, epoch).

    The permutation depends only on ``num_samples``, ``seed`` and the epoch, never on
    the global RNG, so a resumed run gets the same order. ``set_epoch(epoch, start)``
    skips the first ``start`` indices of that epoch's permutation.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be > 0, got {num_samples}")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start must be in [0, {self.num_samples}], got {start}")
        self.epoch = epoch
        self.start = start

    def permutation(self, epoch: int) -> list[int]:
        """Return the full index order of ``epoch``."""
        if not self.shuffle:
            return list(range(self.num_samples))
        generator = torch.Generator()
        generator.manual_seed(epoch_seed(self.seed, epoch))
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.permutation(self.epoch)[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


# ---------------------------------------------------------------------------
# Signals and progress


class TrainingSignals:
    """Flags set by the contract's signals and read by the training loop.

    The handlers only set flags, so the loop decides when to act: at the next step
    boundary. ``install`` must run in the main thread (a rule of ``signal.signal``).
    """

    def __init__(self) -> None:
        self._save_and_exit = False
        self._save_now = False
        self._previous_handlers: dict[int, Any] = {}

    def install(self) -> "TrainingSignals":
        """Install handlers for SIGNAL_SAVE_AND_EXIT and SIGNAL_SAVE_AND_CONTINUE."""
        for signal_number, handler in (
            (contract.SIGNAL_SAVE_AND_EXIT, self._handle_save_and_exit),
            (contract.SIGNAL_SAVE_AND_CONTINUE, self._handle_save_now),
        ):
            self._previous_handlers[signal_number] = signal.signal(signal_number, handler)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were installed before ``install``."""
        for signal_number, handler in self._previous_handlers.items():
            signal.signal(signal_number, handler)
        self._previous_handlers.clear()

    def __enter__(self) -> "TrainingSignals":
        return self.install()

    def __exit__(self, *exc_info: object) -> None:
        self.uninstall()

    def request_save_and_exit(self) -> None:
        self._save_and_exit = True

    def request_save(self) -> None:
        self._save_now = True

    def should_save_and_exit(self) -> bool:
        """Return whether SIGNAL_SAVE_AND_EXIT has arrived. The flag is never cleared."""
        return self._save_and_exit

    def should_save_now(self) -> bool:
        """Return whether SIGNAL_SAVE_AND_CONTINUE arrived since the last call, and clear the flag."""
        requested = self._save_now
        self._save_now = False
        return requested

    def _handle_save_and_exit(self, signal_number: int, frame: object) -> None:
        self.request_save_and_exit()

    def _handle_save_now(self, signal_number: int, frame: object) -> None:
        self.request_save()


class ProgressWriter:
    """Appends one JSON object per line to the progress file, flushed per line.

    With ``path`` None it writes nothing. NaN and infinite floats are written as null
    because JSON has no literal for them.
    """

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path) if path else None
        self._handle = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a", encoding="utf-8")

    def write(self, step: int, **fields: Any) -> None:
        """Append ``{"step": step, **fields, "time": <Unix time>}`` unless fields has "time"."""
        if self._handle is None:
            return
        record = {"step": step, **fields}
        record.setdefault("time", time.time())
        for key, value in record.items():
            if isinstance(value, float) and not math.isfinite(value):
                record[key] = None
        self._handle.write(json.dumps(record, allow_nan=False) + "\n")
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "ProgressWriter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
