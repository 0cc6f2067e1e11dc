"""A training process without torch that follows ml/contract.py, for supervisor tests.

Run as ``python -m tests.fake_trainer`` from the repository root. Each step sleeps
``--step-seconds`` and appends a progress line. Every SPOTRUN_CHECKPOINT_EVERY steps
it commits a checkpoint folder (``state.json`` and ``weights.bin``, then the manifest).
SIGTERM commits a checkpoint at the current step and exits with EXIT_SAVED; SIGUSR1
commits one at the next step and goes on. After ``--total-steps`` steps it writes
``model.bin`` and ``metrics.json`` to SPOTRUN_OUTPUT_DIR and exits with EXIT_COMPLETED.

Each start appends a JSON line with its SPOTRUN_RESUME_FROM to ``--starts-file``.
``--crash-at-step K`` exits with code 1 when step K is reached (K = 0: before any
step), on every start, or only on the first start when ``--crash-marker`` names a file
that this process creates before crashing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from ml import contract

EXIT_CRASHED = 1
EXIT_BAD_ENVIRONMENT = 2


class SignalFlags:
    def __init__(self) -> None:
        self.save_and_exit = False
        self.save_and_continue = False

    def install(self) -> "SignalFlags":
        signal.signal(contract.SIGNAL_SAVE_AND_EXIT, self._on_save_and_exit)
        signal.signal(contract.SIGNAL_SAVE_AND_CONTINUE, self._on_save_and_continue)
        return self

    def _on_save_and_exit(self, signal_number, frame) -> None:
        self.save_and_exit = True

    def _on_save_and_continue(self, signal_number, frame) -> None:
        self.save_and_continue = True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.fake_trainer")
    parser.add_argument("--total-steps", type=int, required=True,
                        help="steps after which training is complete")
    parser.add_argument("--step-seconds", type=float, default=0.02,
                        help="sleep per step, in seconds")
    parser.add_argument("--starts-file", type=Path, required=True,
                        help="JSON lines file that records each start")
    parser.add_argument("--crash-at-step", type=int, default=None,
                        help="exit with code 1 on reaching this step (0: at start)")
    parser.add_argument("--crash-marker", type=Path, default=None,
                        help="crash only while this file does not exist; create it first")
    return parser.parse_args(argv)


def resume_step(resume_from: str) -> int:
    """Return the step of the checkpoint to resume from, or 0 to start from scratch."""
    if not resume_from:
        return 0
    folder = Path(resume_from)
    manifest = contract.read_verified_manifest(folder)
    if manifest is None:
        print(f"checkpoint {folder} does not verify; cannot resume", flush=True)
        sys.exit(EXIT_BAD_ENVIRONMENT)
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    return int(state["step"])


def commit_checkpoint(checkpoint_dir: Path, run_id: str, step: int) -> None:
    folder = checkpoint_dir / contract.step_folder_name(step)
    if contract.read_verified_manifest(folder) is not None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    # A manifest that did not verify belongs to a torn copy of this step. Removing it
    # first keeps the folder uncommitted until the new manifest is written.
    (folder / contract.MANIFEST_NAME).unlink(missing_ok=True)
    contents = {
        "state.json": json.dumps({"step": step}).encode(),
        "weights.bin": bytes(step % 256 for _ in range(2048)),
    }
    files = []
    for name, data in contents.items():
        path = folder / name
        path.write_bytes(data)
        files.append(contract.ManifestFile(name, len(data), contract.sha256_file(path)))
    manifest = contract.Manifest(run_id=run_id, step=step, epoch=0, files=tuple(files),
                                 signature="fake-trainer", created_at=time.time())
    contract.write_manifest(folder, manifest)
    print(f"checkpoint step {step} committed", flush=True)


def should_crash(args: argparse.Namespace, step: int) -> bool:
    if args.crash_at_step is None or step != args.crash_at_step:
        return False
    if args.crash_marker is None:
        return True
    if args.crash_marker.exists():
        return False
    args.crash_marker.write_text("crashed once\n", encoding="utf-8")
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    flags = SignalFlags().install()
    run_id = os.environ[contract.ENV_RUN_ID]
    checkpoint_dir = Path(os.environ[contract.ENV_CHECKPOINT_DIR])
    output_dir = Path(os.environ[contract.ENV_OUTPUT_DIR])
    progress_path = Path(os.environ[contract.ENV_PROGRESS_FILE])
    checkpoint_every = int(os.environ[contract.ENV_CHECKPOINT_EVERY])
    resume_from = os.environ.get(contract.ENV_RESUME_FROM, "")
    data_dir = Path(os.environ[contract.ENV_DATA_DIR])

    with open(args.starts_file, "a", encoding="utf-8") as starts:
        starts.write(json.dumps({"pid": os.getpid(), "resume_from": resume_from}) + "\n")
    if not any(path.is_file() for path in data_dir.rglob("*")):
        print(f"no training data in {data_dir}", flush=True)
        return EXIT_BAD_ENVIRONMENT

    step = resume_step(resume_from)
    print(f"starting at step {step} (resume from {resume_from or 'scratch'})", flush=True)
    if should_crash(args, step):
        print(f"simulated crash at step {step}", flush=True)
        return EXIT_CRASHED
    with open(progress_path, "a", encoding="utf-8") as progress:
        while step < args.total_steps:
            time.sleep(args.step_seconds)
            step += 1
            record = {"step": step, "time": time.time(), "epoch": 0, "loss": 1.0 / step}
            progress.write(json.dumps(record) + "\n")
            progress.flush()
            if should_crash(args, step):
                print(f"simulated crash at step {step}", flush=True)
                return EXIT_CRASHED
            if flags.save_and_exit:
                commit_checkpoint(checkpoint_dir, run_id, step)
                return contract.EXIT_SAVED
            if step % checkpoint_every == 0 or flags.save_and_continue:
                flags.save_and_continue = False
                commit_checkpoint(checkpoint_dir, run_id, step)

    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "model.bin").write_bytes(b"fake model after %d steps" % step)
    (output_dir / contract.METRICS_NAME).write_text(
        json.dumps({"final_step": step, "loss": 1.0 / max(step, 1)}), encoding="utf-8")
    print(f"training complete after {step} steps", flush=True)
    return contract.EXIT_COMPLETED


if __name__ == "__main__":
    sys.exit(main())
