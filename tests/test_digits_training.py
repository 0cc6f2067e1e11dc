"""The sample job ml.digits run as real subprocesses, stopped with real signals.

The runs use a narrow model. Runs that receive a signal pause after each step
(--step-delay), so that a signal sent when the progress file reaches a step lands
within a step or two of it.
The exact stop step may vary between runs; the final weights must not.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ml import contract

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data" / "digits"

# 1797 samples, 20% held out: 1438 training samples, so 23 steps per epoch at 64.
STEPS_PER_EPOCH = 23
EPOCHS = 3
LR = 0.002
GAMMA = 0.5
TRAINING_ARGS = [
    "--epochs", str(EPOCHS),
    "--batch-size", "64",
    "--channels", "8",
    "--hidden", "32",
    "--lr", str(LR),
    "--milestones", "1,2",
    "--gamma", str(GAMMA),
    "--device", "cpu",
]  # fmt: skip
# Pause per step of runs that receive a signal, so that the stop lands near its target.
SIGNALED_STEP_DELAY = "0.02"
TIMEOUT_SECONDS = 120


@dataclass
class Run:
    """Paths of one training run, shared by all processes that continue it."""

    root: Path
    run_id: str = "digits-test"

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def output_dir(self) -> Path:
        return self.root / "output"

    @property
    def progress_file(self) -> Path:
        return self.root / "progress.jsonl"

    def environment(self, resume_from: Path | None, checkpoint_every: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                contract.ENV_RUN_ID: self.run_id,
                contract.ENV_CHECKPOINT_DIR: str(self.checkpoint_dir),
                contract.ENV_RESUME_FROM: str(resume_from) if resume_from else "",
                contract.ENV_DATA_DIR: str(DATA_DIR),
                contract.ENV_OUTPUT_DIR: str(self.output_dir),
                contract.ENV_PROGRESS_FILE: str(self.progress_file),
                contract.ENV_CHECKPOINT_EVERY: str(checkpoint_every),
                "OMP_NUM_THREADS": "1",
            }
        )
        return env

    def metrics(self) -> dict:
        return json.loads((self.output_dir / contract.METRICS_NAME).read_text())

    def progress_by_step(self) -> dict[int, dict]:
        """Return the progress record of each step. A repeated step must repeat its values."""
        records: dict[int, dict] = {}
        for line in self.progress_file.read_text().splitlines():
            record = json.loads(line)
            comparable = {key: record[key] for key in ("epoch", "loss", "lr")}
            previous = records.setdefault(record["step"], comparable)
            assert previous == comparable, f"step {record['step']} was repeated with other values"
        return records

    def committed_steps(self) -> list[int]:
        return [step for step, _ in contract.committed_local_checkpoints(self.checkpoint_dir)]


@dataclass
class Finished:
    returncode: int
    stderr: str


def last_progress_step(path: Path) -> int:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return -1
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError):
            continue  # a line still being written
    return -1


def run_digits(
    run: Run,
    *,
    resume_from: Path | None = None,
    signal_at_step: int | None = None,
    signal_number: int = contract.SIGNAL_SAVE_AND_EXIT,
    checkpoint_every: int = 0,
    extra_args: tuple[str, ...] = (),
    data_dir: Path | None = None,
) -> Finished:
    """Run ``python -m ml.digits`` and send ``signal_number`` once progress reaches a step."""
    env = run.environment(resume_from, checkpoint_every)
    if data_dir is not None:
        env[contract.ENV_DATA_DIR] = str(data_dir)
    delay_args = ("--step-delay", SIGNALED_STEP_DELAY) if signal_at_step is not None else ()
    process = subprocess.Popen(
        [sys.executable, "-m", "ml.digits", *TRAINING_ARGS, *delay_args, *extra_args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        if signal_at_step is not None:
            deadline = time.monotonic() + TIMEOUT_SECONDS
            while process.poll() is None and time.monotonic() < deadline:
                if last_progress_step(run.progress_file) >= signal_at_step:
                    process.send_signal(signal_number)
                    break
                time.sleep(0.002)
        _, stderr = process.communicate(timeout=TIMEOUT_SECONDS)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return Finished(process.returncode, stderr)


def stop_at(run: Run, step: int, resume_from: Path | None = None) -> int:
    """Stop a run with SIGTERM at about ``step`` and return the committed step."""
    committed_before = set(run.committed_steps())
    finished = run_digits(run, resume_from=resume_from, signal_at_step=step)
    assert finished.returncode == contract.EXIT_SAVED, finished.stderr
    new_steps = sorted(set(run.committed_steps()) - committed_before)
    assert len(new_steps) == 1, f"expected one new checkpoint, found {new_steps}"
    stopped = new_steps[0]
    assert f"received SIGTERM: saving step {stopped}" in finished.stderr
    assert f"checkpoint committed: step {stopped}" in finished.stderr
    return stopped


def finish(run: Run, resume_from: Path) -> Finished:
    finished = run_digits(run, resume_from=resume_from)
    assert finished.returncode == contract.EXIT_COMPLETED, finished.stderr
    return finished


def folder(run: Run, step: int) -> Path:
    return run.checkpoint_dir / contract.step_folder_name(step)


def epoch_of_step(step: int) -> int:
    """Return the epoch that step ``step`` (1-based) trains in."""
    return (step - 1) // STEPS_PER_EPOCH


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Run:
    run = Run(tmp_path_factory.mktemp("baseline"))
    finished = run_digits(run)
    assert finished.returncode == contract.EXIT_COMPLETED, finished.stderr
    return run


def assert_same_as_baseline(run: Run, baseline: Run) -> None:
    expected, actual = baseline.metrics(), run.metrics()
    assert actual["final_weights_sha256"] == expected["final_weights_sha256"]
    assert actual["final_loss"] == expected["final_loss"]
    assert actual["val_accuracy"] == expected["val_accuracy"]
    assert actual["final_step"] == expected["final_step"]
    assert run.progress_by_step() == baseline.progress_by_step()


# ---------------------------------------------------------------------------
# Uninterrupted run


def test_baseline_outputs(baseline):
    metrics = baseline.metrics()
    progress = baseline.progress_by_step()

    assert metrics["final_step"] == EPOCHS * STEPS_PER_EPOCH
    assert metrics["epochs"] == EPOCHS
    assert isinstance(metrics["final_loss"], float)
    assert metrics["final_loss"] == progress[metrics["final_step"]]["loss"]
    assert len(metrics["final_weights_sha256"]) == 64
    assert 0.5 < metrics["val_accuracy"] <= 1.0
    assert (baseline.output_dir / "model.pt").stat().st_size > 0
    assert sorted(progress) == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    for step, record in progress.items():
        epoch = epoch_of_step(step)
        assert record["epoch"] == epoch
        assert math.isclose(record["lr"], LR * GAMMA**epoch), f"step {step}"
    assert baseline.committed_steps() == []


def test_output_weights_match_metrics(baseline):
    import warnings

    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch

    from ml.checkpoint import state_dict_sha256

    weights = torch.load(baseline.output_dir / "model.pt", weights_only=True)
    assert state_dict_sha256(weights) == baseline.metrics()["final_weights_sha256"]


# ---------------------------------------------------------------------------
# Stop with SIGTERM, resume, compare


def test_resume_mid_epoch_identical(tmp_path, baseline):
    run = Run(tmp_path)

    stopped = stop_at(run, 8)
    assert epoch_of_step(stopped) == 0
    assert stopped % STEPS_PER_EPOCH != 0
    # SIGUSR1 during the resumed run commits a checkpoint and training goes on.
    finished = run_digits(
        run, resume_from=folder(run, stopped), signal_at_step=stopped + 25, signal_number=signal.SIGUSR1
    )

    assert finished.returncode == contract.EXIT_COMPLETED, finished.stderr
    assert f"resumed from step {stopped}" in finished.stderr
    assert "received SIGUSR1" in finished.stderr
    assert len(run.committed_steps()) == 2
    assert_same_as_baseline(run, baseline)


def test_resume_twice_within_epoch_identical(tmp_path, baseline):
    run = Run(tmp_path)

    first = stop_at(run, 27)
    second = stop_at(run, first + 8, resume_from=folder(run, first))
    finish(run, folder(run, second))

    assert epoch_of_step(first) == 1
    assert epoch_of_step(second) == 1
    assert first < second
    assert_same_as_baseline(run, baseline)


def test_resume_after_milestone_identical(tmp_path, baseline):
    run = Run(tmp_path)

    stopped = stop_at(run, 2 * STEPS_PER_EPOCH + 4)
    progress = run.progress_by_step()
    finish(run, folder(run, stopped))

    assert epoch_of_step(stopped) == 2
    assert math.isclose(progress[stopped]["lr"], LR * GAMMA**2)
    assert_same_as_baseline(run, baseline)


def test_resume_after_sigkill_identical(tmp_path, baseline):
    run = Run(tmp_path)
    run_digits(run, checkpoint_every=1, signal_at_step=30, signal_number=signal.SIGKILL)
    committed = run.committed_steps()
    verified = [step for step in committed if contract.read_verified_manifest(folder(run, step)) is not None]

    finished = run_digits(run, resume_from=run.checkpoint_dir, checkpoint_every=1)

    assert finished.returncode == contract.EXIT_COMPLETED, finished.stderr
    assert committed, "no checkpoint was committed before SIGKILL"
    assert verified == committed, "a manifest exists for a checkpoint that does not verify"
    assert f"resumed from step {max(committed)}" in finished.stderr
    assert_same_as_baseline(run, baseline)


def test_torn_checkpoint_skipped_on_resume(tmp_path, baseline):
    run = Run(tmp_path)
    finished = run_digits(run, checkpoint_every=10, signal_at_step=45)
    assert finished.returncode == contract.EXIT_SAVED, finished.stderr
    *older, second_newest, newest = run.committed_steps()
    (folder(run, newest) / contract.MANIFEST_NAME).unlink()
    model_file = folder(run, second_newest) / "model.pt"
    os.truncate(model_file, model_file.stat().st_size - 1)

    finished = finish(run, run.checkpoint_dir)

    assert older[-3:] == [10, 20, 30]
    assert second_newest == 40
    assert "resumed from step 30" in finished.stderr
    assert_same_as_baseline(run, baseline)


# ---------------------------------------------------------------------------
# Rejected input


def has_loaded_library(pid: int, name: str) -> bool:
    """Return whether process ``pid`` has mapped a shared library whose path contains ``name``."""
    try:
        return name in Path(f"/proc/{pid}/maps").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_sigterm_while_importing_torch_saves(tmp_path):
    run = Run(tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-m", "ml.digits", *TRAINING_ARGS],
        cwd=REPO_ROOT,
        env=run.environment(None, 0),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT_SECONDS
        while process.poll() is None and time.monotonic() < deadline:
            # libtorch is mapped at the start of `import torch`, which takes about a
            # second more, so the real signal handlers are not installed yet.
            if has_loaded_library(process.pid, "libtorch"):
                process.send_signal(signal.SIGTERM)
                break
            time.sleep(0.001)
        _, stderr = process.communicate(timeout=TIMEOUT_SECONDS)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == contract.EXIT_SAVED, stderr
    assert run.committed_steps() == [0]
    assert contract.read_verified_manifest(folder(run, 0)) is not None
    assert last_progress_step(run.progress_file) == -1  # no step was trained


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> tuple[Run, Path]:
    """Return a run stopped early and the folder of its checkpoint."""
    run = Run(tmp_path_factory.mktemp("stopped"))
    stopped = stop_at(run, 3)
    return run, folder(run, stopped)


def test_signature_mismatch_rejected(stopped_run):
    run, checkpoint_folder = stopped_run

    finished = run_digits(run, resume_from=checkpoint_folder, extra_args=("--hidden", "48"))

    assert finished.returncode == 2
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1, finished.stderr
    assert "parameter fc1.weight has shape (32, 256) in the checkpoint but (48, 256) in the model" in lines[0]
    assert "run_name" in lines[0]
    assert "Traceback" not in finished.stderr
    assert not (run.output_dir / contract.METRICS_NAME).exists()


def test_run_id_mismatch_rejected(stopped_run):
    run, checkpoint_folder = stopped_run
    other_run = Run(run.root, run_id="another-run")

    finished = run_digits(other_run, resume_from=checkpoint_folder)

    assert finished.returncode == 2
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1, finished.stderr
    assert "'digits-test'" in lines[0]
    assert "'another-run'" in lines[0]


def test_batch_size_mismatch_rejected(stopped_run):
    run, checkpoint_folder = stopped_run

    finished = run_digits(run, resume_from=checkpoint_folder, extra_args=("--batch-size", "32"))

    assert finished.returncode == 2
    assert len(finished.stderr.strip().splitlines()) == 1, finished.stderr
    assert "--batch-size 64" in finished.stderr
    assert "--batch-size 32" in finished.stderr


def test_missing_data_file_exits_2(tmp_path):
    missing = tmp_path / "no-data"

    finished = run_digits(Run(tmp_path), data_dir=missing)

    assert finished.returncode == 2
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1, finished.stderr
    assert str(missing / "digits.csv.gz") in lines[0]
    assert "Traceback" not in finished.stderr


def test_malformed_data_file_exits_2(tmp_path):
    import gzip

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with gzip.open(data_dir / "digits.csv.gz", "wt") as handle:
        handle.write(",".join(["0"] * 65) + "\n" + ",".join(["0"] * 64) + ",12\n")

    finished = run_digits(Run(tmp_path), data_dir=data_dir)

    assert finished.returncode == 2
    assert "digits.csv.gz:2: label 12 is not in [0, 9]" in finished.stderr
    assert "Traceback" not in finished.stderr


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (("--epochs", "0"), "argument --epochs: invalid value '0'"),
        (("--lr", "fast"), "argument --lr: invalid value 'fast'"),
        (("--milestones", "5,2"), "argument --milestones: invalid value '5,2'"),
        (("--val-fraction", "1.5"), "argument --val-fraction: invalid value '1.5'"),
    ],
)
def test_invalid_argument_named(arguments, expected):
    result = subprocess.run(
        [sys.executable, "-m", "ml.digits", *arguments],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
    )

    assert result.returncode == 2
    assert expected in result.stderr


def test_invalid_checkpoint_every_named(tmp_path):
    run = Run(tmp_path)
    env = run.environment(None, 0)
    env[contract.ENV_CHECKPOINT_EVERY] = "ten"

    result = subprocess.run(
        [sys.executable, "-m", "ml.digits"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 2
    assert "SPOTRUN_CHECKPOINT_EVERY='ten'" in result.stderr
