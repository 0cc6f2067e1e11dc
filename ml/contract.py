"""The contract between the bootstrap (supervisor) and any training process.

This module is standard library only: the bootstrap imports it and never imports torch.

A training process is started by the bootstrap with the environment variables below.
It follows these rules:

* It writes checkpoints as folders ``CHECKPOINT_DIR/step-NNNNNNNN/``. The files of a
  checkpoint are written first; ``manifest.json`` is written last, by an atomic rename.
  A folder without a manifest that verifies is not a checkpoint and is ignored.
* It never deletes a checkpoint folder. The bootstrap uploads committed folders to S3
  and prunes old local copies.
* On ``SIGNAL_SAVE_AND_EXIT`` (SIGTERM) it finishes the current step, commits a
  checkpoint, and exits with ``EXIT_SAVED``.
* On ``SIGNAL_SAVE_AND_CONTINUE`` (SIGUSR1) it commits a checkpoint at the next step
  boundary and goes on training.
* It appends one JSON object per line to ``PROGRESS_FILE`` (at least ``step`` and
  ``time``; ``epoch``, ``loss``, ``lr`` and ``total_steps`` when known). The bootstrap
  reads it as the heartbeat and forwards it to the run status.
* When training is complete it writes the final model and ``metrics.json`` into
  ``OUTPUT_DIR`` and exits with ``EXIT_COMPLETED``. Any other exit code is a crash.
* Under torchrun (more than one process), every rank gets the signals. All ranks must
  act on a request at the same step, local rank 0 of every instance writes the
  checkpoint, the progress file and the outputs, and a rank whose collective fails
  exits with ``EXIT_PEER_LOST``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path

# Environment variables set by the bootstrap for the training process.
ENV_RUN_ID = "SPOTRUN_RUN_ID"
ENV_CHECKPOINT_DIR = "SPOTRUN_CHECKPOINT_DIR"
ENV_RESUME_FROM = "SPOTRUN_RESUME_FROM"  # empty or unset: start from scratch
ENV_DATA_DIR = "SPOTRUN_DATA_DIR"
ENV_OUTPUT_DIR = "SPOTRUN_OUTPUT_DIR"
ENV_PROGRESS_FILE = "SPOTRUN_PROGRESS_FILE"
ENV_CHECKPOINT_EVERY = "SPOTRUN_CHECKPOINT_EVERY"  # steps between periodic checkpoints
# Seconds one collective may wait for its peers under torchrun before it fails.
ENV_COLLECTIVE_TIMEOUT = "SPOTRUN_COLLECTIVE_TIMEOUT"

SIGNAL_SAVE_AND_EXIT = signal.SIGTERM
SIGNAL_SAVE_AND_CONTINUE = signal.SIGUSR1

EXIT_COMPLETED = 0
# Stopped on request after committing a checkpoint (EX_TEMPFAIL from sysexits.h).
EXIT_SAVED = 75
# Under torchrun: a collective failed or timed out because a peer process or instance
# is gone or hung. Nothing was saved; the supervisor starts a new rendezvous round.
EXIT_PEER_LOST = 76

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
METRICS_NAME = "metrics.json"
STEP_FOLDER_PATTERN = re.compile(r"^step-(\d{8})$")


def step_folder_name(step: int) -> str:
    """Return the folder name of the checkpoint taken after ``step`` optimizer steps."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"step-{step:08d}"


def parse_step_folder(name: str) -> int | None:
    """Return the step encoded in a checkpoint folder name, or None for other names."""
    match = STEP_FOLDER_PATTERN.match(name)
    return int(match.group(1)) if match else None


def sha256_file(path: Path, chunk_bytes: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ManifestFile:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """Description of one committed checkpoint; its presence is the commit."""

    run_id: str
    step: int
    epoch: int
    files: tuple[ManifestFile, ...]
    signature: str
    created_at: float

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": MANIFEST_FORMAT,
                "run_id": self.run_id,
                "step": self.step,
                "epoch": self.epoch,
                "signature": self.signature,
                "created_at": self.created_at,
                "files": [vars(item) for item in self.files],
            },
            indent=2,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        """Parse a manifest; raise ValueError when it is malformed."""
        try:
            data = json.loads(text)
            if data.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"unsupported manifest format {data.get('format')!r}")
            files = tuple(
                ManifestFile(str(f["name"]), int(f["size"]), str(f["sha256"]))
                for f in data["files"]
            )
            return cls(
                run_id=str(data["run_id"]),
                step=int(data["step"]),
                epoch=int(data["epoch"]),
                files=files,
                signature=str(data["signature"]),
                created_at=float(data["created_at"]),
            )
        except (KeyError, TypeError, json.JSONDecodeError) as error:
            raise ValueError(f"malformed checkpoint manifest: {error}") from error


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Commit a checkpoint folder by writing its manifest atomically, after its files."""
    temporary = folder / (MANIFEST_NAME + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(manifest.to_json())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, folder / MANIFEST_NAME)
    directory_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)


def read_verified_manifest(folder: Path, check_hashes: bool = True) -> Manifest | None:
    """Return the manifest of a committed local checkpoint folder, or None.

    None means the folder is not a usable checkpoint: no manifest, a malformed one, a
    step that does not match the folder name, or a file missing or differing in size or
    (when ``check_hashes``) in SHA-256.
    """
    manifest_path = folder / MANIFEST_NAME
    try:
        manifest = Manifest.from_json(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if parse_step_folder(folder.name) != manifest.step:
        return None
    for item in manifest.files:
        path = folder / item.name
        try:
            if path.stat().st_size != item.size:
                return None
        except OSError:
            return None
        if check_hashes and sha256_file(path) != item.sha256:
            return None
    return manifest


def committed_local_checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """Return (step, folder) of local folders that carry a manifest, oldest first.

    Hashes are not checked here; call ``read_verified_manifest`` before trusting one.
    """
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for child in checkpoint_dir.iterdir():
        step = parse_step_folder(child.name)
        if step is not None and (child / MANIFEST_NAME).is_file():
            found.append((step, child))
    return sorted(found)
