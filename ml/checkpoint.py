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
host memory. A background thread serializes the copy, fsyncs the files and writes the
manifest. A typical loop::

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

import copy
import ctypes
import hashlib
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
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


class _HostBuffers:
    """Host-memory copies of state tensors, reused across saves when shape and dtype match.

    Buffers for tensors on CUDA are pinned so that the device-to-host copies can be
    issued without blocking, and one synchronization waits for all of them. A caller
    must not start a new snapshot while a previous one is still being serialized,
    because the buffers are overwritten in place.

    NOTE: the CUDA path (pinned buffers, non-blocking copies) has not been run yet,
    because the tests run on the CPU only.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def snapshot(self, value: Any) -> Any:
        """Return a copy of ``value`` whose tensors live in the reusable host buffers."""
        copied_from_cuda = [False]
        result = self._copy(value, (), copied_from_cuda)
        if copied_from_cuda[0]:
            # The non-blocking copies must finish before the caller may change the
            # tensors again or the writer thread reads the buffers.
            torch.cuda.synchronize()
        return result

    def _copy(self, value: Any, path: tuple, copied_from_cuda: list[bool]) -> Any:
        if isinstance(value, torch.Tensor):
            return self._copy_tensor(value, path, copied_from_cuda)
        if isinstance(value, dict):
            items = {key: self._copy(item, path + (key,), copied_from_cuda) for key, item in value.items()}
            # Keep OrderedDict and collections.Counter (used by MultiStepLR) as they are.
            return items if type(value) is dict else type(value)(items)
        if isinstance(value, (list, tuple)):
            items = [self._copy(item, path + (index,), copied_from_cuda) for index, item in enumerate(value)]
            return items if type(value) is list else tuple(items)
        return copy.deepcopy(value)

    def _copy_tensor(self, tensor: torch.Tensor, path: tuple, copied_from_cuda: list[bool]) -> torch.Tensor:
        source = tensor.detach()
        buffer = self._buffers.get(path)
        if buffer is None or buffer.shape != source.shape or buffer.dtype != source.dtype:
            buffer = torch.empty(source.shape, dtype=source.dtype, device="cpu", pin_memory=source.is_cuda)
            self._buffers[path] = buffer
        buffer.copy_(source, non_blocking=source.is_cuda)
        copied_from_cuda[0] = copied_from_cuda[0] or source.is_cuda
        return buffer


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
    write_seconds: float  # time the writer thread took to serialize, fsync and commit
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


class Checkpointer:
    """Saves the training state asynchronously into step folders and loads it back.

    At most one save is in flight: ``save`` first waits for the previous one. A failed
    save leaves its folder without a manifest, and the next ``save``, ``wait`` or
    ``close`` raises ``CheckpointSaveError``.
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike,
        run_id: str,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
        scaler: Any | None = None,
    ) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.run_id = run_id
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self._buffers = _HostBuffers()
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
        files = self._capture(step, epoch, position, extra)
        blocked_seconds = time.monotonic() - started

        self._thread = threading.Thread(
            target=self._write,
            args=(folder, step, epoch, files, blocked_seconds),
            name=f"checkpoint-writer-{step}",
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
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, folder = self._error, self._failed_folder
            self._error = None
            raise CheckpointSaveError(f"checkpoint save into {folder} failed: {error}") from error
        return self._result

    def close(self) -> SaveResult | None:
        """Wait for the save in flight and make later calls to ``save`` raise."""
        try:
            return self.wait()
        finally:
            self._closed = True

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

    def _capture(self, step: int, epoch: int, position: int, extra: Mapping[str, Any] | None) -> dict[str, Any]:
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
        files = self._buffers.snapshot(state)
        files[SIGNATURE_FILE] = signature_entries(self.model)
        return files

    def _write(self, folder: Path, step: int, epoch: int, files: dict[str, Any], blocked_seconds: float) -> None:
        started = time.monotonic()
        try:
            manifest_files = self._write_files(folder, files)
            manifest = contract.Manifest(
                run_id=self.run_id,
                step=step,
                epoch=epoch,
                files=tuple(manifest_files),
                signature=model_signature_from_entries(files[SIGNATURE_FILE]),
                created_at=time.time(),
            )
            contract.write_manifest(folder, manifest)
        except BaseException as error:  # noqa: BLE001 - reported to the training loop by wait()
            logger.error("checkpoint save for step %d into %s failed: %s", step, folder, error)
            self._error = error
            self._failed_folder = folder
            return

        write_seconds = time.monotonic() - started
        total_bytes = sum(item.size for item in manifest_files)
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

    def _write_files(self, folder: Path, files: dict[str, Any]) -> list[contract.ManifestFile]:
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
        for name, payload in files.items():
            path = folder / name
            self._write_file(path, payload)
            manifest_files.append(contract.ManifestFile(name, path.stat().st_size, contract.sha256_file(path)))
        return manifest_files

    def _write_file(self, path: Path, payload: Any) -> None:
        with open(path, "wb") as handle:
            if path.suffix == ".json":
                handle.write(json.dumps(payload, indent=1).encode("utf-8"))
            else:
                torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())


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
    path = Path(path)
    if contract.parse_step_folder(path.name) is not None:
        if not path.is_dir():
            raise CheckpointNotFoundError(f"checkpoint folder not found: {path}")
        return path
    if not path.is_dir():
        raise CheckpointNotFoundError(f"checkpoint directory not found: {path}")
    latest = find_latest_checkpoint(path)
    if latest is None:
        raise CheckpointNotFoundError(f"no committed checkpoint with a valid manifest in {path}")
    return latest


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
    one is used. The manifest and file hashes are verified first. Raises
    ``CheckpointCorruptError`` for a folder that does not verify, and
    ``CheckpointMismatchError`` when ``run_id`` (if given) or the model's parameter
    names, shapes or dtypes differ from the checkpoint. These checks run before
    anything is restored.
    """
    folder = resolve_checkpoint(path)
    manifest = contract.read_verified_manifest(folder)
    if manifest is None:
        raise CheckpointCorruptError(
            f"checkpoint {folder} is incomplete or damaged: its manifest is missing or "
            "invalid, or a file is missing or differs in size or SHA-256; resume from "
            "an older checkpoint or start from scratch"
        )

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

    trainer_state = _torch_load(folder / TRAINER_FILE)
    if trainer_state.get("format") != TRAINER_FORMAT:
        raise CheckpointCorruptError(
            f"checkpoint {folder} has trainer state format {trainer_state.get('format')!r}, "
            f"expected {TRAINER_FORMAT}"
        )
    optimizer_state = _torch_load(folder / OPTIMIZER_FILE)
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

    model.load_state_dict(_torch_load(folder / MODEL_FILE))
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
