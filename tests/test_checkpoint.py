"""ml.checkpoint tested with real files, real signals and a real child process."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402
from torch import nn  # noqa: E402

from ml import checkpoint, contract  # noqa: E402
from ml.checkpoint import (  # noqa: E402
    CheckpointCorruptError,
    CheckpointMismatchError,
    CheckpointSaveError,
    Checkpointer,
    DeterministicSampler,
    ProgressWriter,
    TrainingSignals,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
RUN_ID = "run-a"


def make_model(hidden: int = 16) -> nn.Module:
    from collections import OrderedDict

    return nn.Sequential(
        OrderedDict(
            [
                ("fc1", nn.Linear(8, hidden)),
                ("norm", nn.BatchNorm1d(hidden)),
                ("relu", nn.ReLU()),
                ("dropout", nn.Dropout(0.3)),
                ("fc2", nn.Linear(hidden, 3)),
            ]
        )
    )


def make_training(hidden: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    model = make_model(hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[3, 5], gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=128.0)
    return model, optimizer, scheduler, scaler


def train_steps(model, optimizer, scheduler, scaler, count: int) -> list[tuple[float, float, float, float]]:
    """Run ``count`` steps on random data and return (loss, lr, random.random(), torch.rand) per step."""
    records = []
    for _ in range(count):
        inputs = torch.randn(4, 8)
        targets = torch.randint(0, 3, (4,))
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), targets)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        records.append((loss.item(), lr, random.random(), torch.rand(()).item()))
    return records


def step_folder(checkpoint_dir: Path, step: int) -> Path:
    return checkpoint_dir / contract.step_folder_name(step)


# ---------------------------------------------------------------------------
# Hashes and signatures


def test_state_dict_sha256_matches_documented_layout():
    state = {"b": torch.tensor([1.0, 2.0]), "a": torch.tensor([[3]], dtype=torch.int64)}
    expected = hashlib.sha256()
    for name, dtype, shape, data in (
        ("a", "torch.int64", [1, 1], struct.pack("=q", 3)),
        ("b", "torch.float32", [2], struct.pack("=ff", 1.0, 2.0)),
    ):
        expected.update(json.dumps([name, dtype, shape, len(data)]).encode() + b"\n")
        expected.update(data)

    assert checkpoint.state_dict_sha256(state) == expected.hexdigest()


def test_state_dict_sha256_sensitivity():
    model = make_model()
    reference = checkpoint.state_dict_sha256(model)

    assert checkpoint.state_dict_sha256(model.state_dict()) == reference
    reordered = dict(reversed(list(model.state_dict().items())))
    assert checkpoint.state_dict_sha256(reordered) == reference

    changed = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    changed["fc2.bias"][0] += 1e-6
    assert checkpoint.state_dict_sha256(changed) != reference

    as_double = {name: tensor.double() for name, tensor in model.state_dict().items()}
    assert checkpoint.state_dict_sha256(as_double) != reference

    transposed = dict(model.state_dict())
    transposed["fc1.weight"] = transposed["fc1.weight"].t()  # a non-contiguous view
    assert checkpoint.state_dict_sha256(transposed) == checkpoint.state_dict_sha256(
        {**transposed, "fc1.weight": transposed["fc1.weight"].contiguous()}
    )


def test_state_dict_sha256_same_in_child_process(tmp_path):
    torch.manual_seed(7)
    model = make_model()
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    script = (
        "import sys, warnings, torch\n"
        "warnings.filterwarnings('ignore')\n"
        "from ml.checkpoint import state_dict_sha256\n"
        f"print(state_dict_sha256(torch.load({str(path)!r}, weights_only=True)))\n"
    )

    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True
    )

    assert result.stdout.strip() == checkpoint.state_dict_sha256(model)


def test_model_signature_ignores_values_not_shapes():
    first, second = make_model(), make_model()
    with torch.no_grad():
        second.fc1.weight.add_(1.0)

    assert checkpoint.model_signature(first) == checkpoint.model_signature(second)
    assert checkpoint.model_signature(first) != checkpoint.model_signature(make_model(hidden=17))


# ---------------------------------------------------------------------------
# Save and load


def test_resume_continues_identically(tmp_path):
    random.seed(1)
    model, optimizer, scheduler, scaler = make_training()
    train_steps(model, optimizer, scheduler, scaler, 4)  # past the first milestone
    with Checkpointer(tmp_path, RUN_ID, model, optimizer, scheduler, scaler) as saver:
        saver.save(step=4, epoch=1, position=12, extra={"note": "after 4 steps"})
    expected = train_steps(model, optimizer, scheduler, scaler, 5)
    expected_hash = checkpoint.state_dict_sha256(model)

    random.seed(999)  # disturb every RNG that the checkpoint must restore
    torch.manual_seed(999)
    resumed = make_training(seed=123)
    state = checkpoint.load(step_folder(tmp_path, 4), *resumed, run_id=RUN_ID)
    actual = train_steps(*resumed, 5)

    assert (state.step, state.epoch, state.position) == (4, 1, 12)
    assert state.extra == {"note": "after 4 steps"}
    assert state.run_id == RUN_ID
    assert actual == expected
    assert checkpoint.state_dict_sha256(resumed[0]) == expected_hash
    assert resumed[2].last_epoch == scheduler.last_epoch
    assert resumed[3].get_scale() == scaler.get_scale()


def test_manifest_lists_files_and_signature(tmp_path):
    model, optimizer, scheduler, scaler = make_training()
    with Checkpointer(tmp_path, RUN_ID, model, optimizer, scheduler) as saver:
        folder = saver.save(step=12, epoch=3)
        result = saver.wait()

    manifest = contract.read_verified_manifest(folder)
    assert manifest is not None
    assert folder == step_folder(tmp_path, 12)
    assert (manifest.step, manifest.epoch, manifest.run_id) == (12, 3, RUN_ID)
    assert manifest.signature == checkpoint.model_signature(model)
    names = sorted(item.name for item in manifest.files)
    assert names == sorted(
        [checkpoint.MODEL_FILE, checkpoint.OPTIMIZER_FILE, checkpoint.TRAINER_FILE, checkpoint.SIGNATURE_FILE]
    )
    for item in manifest.files:
        assert (folder / item.name).stat().st_size == item.size
        assert contract.sha256_file(folder / item.name) == item.sha256
    assert result.total_bytes == sum(item.size for item in manifest.files)
    loaded = torch.load(folder / checkpoint.MODEL_FILE, weights_only=True)
    assert checkpoint.state_dict_sha256(loaded) == checkpoint.state_dict_sha256(model)


def test_save_snapshots_state_before_returning(tmp_path):
    model, optimizer, scheduler, _ = make_training()
    expected_hash = checkpoint.state_dict_sha256(model)
    saver = Checkpointer(tmp_path, RUN_ID, model, optimizer, scheduler)

    folder = saver.save(step=1, epoch=0)
    with torch.no_grad():  # the training loop goes on while the writer thread runs
        for parameter in model.parameters():
            parameter.fill_(0.5)
    saver.close()

    saved = torch.load(folder / checkpoint.MODEL_FILE, weights_only=True)
    assert checkpoint.state_dict_sha256(saved) == expected_hash


def test_saves_reuse_host_buffers_one_at_a_time(tmp_path):
    model, optimizer, scheduler, _ = make_training()
    saver = Checkpointer(tmp_path, RUN_ID, model, optimizer, scheduler)

    saver.save(step=1, epoch=0)
    # Reads private state: the buffers must be the same tensors on every save.
    buffers = saver._buffers._buffers
    first_pointers = {key: tensor.data_ptr() for key, tensor in buffers.items()}
    saver.save(step=2, epoch=0)
    first_committed_before_second = contract.read_verified_manifest(step_folder(tmp_path, 1)) is not None
    second_pointers = {key: tensor.data_ptr() for key, tensor in buffers.items()}
    saver.close()

    assert first_committed_before_second
    assert first_pointers == second_pointers
    assert ("model.pt", "fc1.weight") in buffers
    assert contract.read_verified_manifest(step_folder(tmp_path, 2)) is not None


def test_failed_save_leaves_no_manifest(tmp_path):
    model, optimizer, scheduler, _ = make_training()
    saver = Checkpointer(tmp_path, RUN_ID, model, optimizer, scheduler)

    # A lambda cannot be pickled, so writing trainer.pt fails after model.pt is written.
    saver.save(step=5, epoch=0, extra={"callback": lambda: None})
    with pytest.raises(CheckpointSaveError, match="step-00000005"):
        saver.wait()

    failed = step_folder(tmp_path, 5)
    assert (failed / checkpoint.MODEL_FILE).exists()
    assert not (failed / contract.MANIFEST_NAME).exists()
    assert contract.read_verified_manifest(failed) is None
    assert checkpoint.find_latest_checkpoint(tmp_path) is None

    saver.save(step=5, epoch=0)
    saver.close()
    assert contract.read_verified_manifest(failed) is not None


def test_save_into_file_path_fails(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the checkpoint directory should be")
    model, optimizer, scheduler, _ = make_training()
    saver = Checkpointer(blocker, RUN_ID, model, optimizer, scheduler)

    saver.save(step=1, epoch=0)

    with pytest.raises(CheckpointSaveError):
        saver.close()


def test_save_of_committed_step_is_skipped(tmp_path):
    model, optimizer, scheduler, _ = make_training()
    with Checkpointer(tmp_path, RUN_ID, model, optimizer, scheduler) as saver:
        saver.save(step=3, epoch=0)
        saver.wait()
        manifest_before = (step_folder(tmp_path, 3) / contract.MANIFEST_NAME).read_text()
        saver.save(step=3, epoch=0)
        result = saver.wait()

    assert result.skipped
    assert (step_folder(tmp_path, 3) / contract.MANIFEST_NAME).read_text() == manifest_before

    # A new process that resumed from this folder skips it as well.
    other = Checkpointer(tmp_path, RUN_ID, *make_training()[:3])
    other.load(step_folder(tmp_path, 3))
    other.save(step=3, epoch=0)
    assert other.close().skipped


def test_save_rewrites_torn_folder_of_same_step(tmp_path):
    model, optimizer, scheduler, _ = make_training()
    with Checkpointer(tmp_path, RUN_ID, model, optimizer, scheduler) as saver:
        saver.save(step=3, epoch=0)
    folder = step_folder(tmp_path, 3)
    with open(folder / checkpoint.MODEL_FILE, "r+b") as handle:
        handle.truncate(10)

    with Checkpointer(tmp_path, RUN_ID, model, optimizer, scheduler) as saver:
        saver.save(step=3, epoch=0)
        result = saver.wait()

    assert not result.skipped
    assert contract.read_verified_manifest(folder) is not None


def test_save_rejects_folder_of_other_run(tmp_path):
    model, optimizer, scheduler, _ = make_training()
    with Checkpointer(tmp_path, "other-run", model, optimizer, scheduler) as saver:
        saver.save(step=3, epoch=0)

    saver = Checkpointer(tmp_path, RUN_ID, model, optimizer, scheduler)
    with pytest.raises(CheckpointSaveError, match="other-run"):
        saver.save(step=3, epoch=0)


# ---------------------------------------------------------------------------
# Mismatches


def test_load_rejects_other_shapes(tmp_path):
    model, optimizer, scheduler, _ = make_training(hidden=128)
    with Checkpointer(tmp_path, RUN_ID, model, optimizer, scheduler) as saver:
        folder = saver.save(step=2, epoch=0)
    other_model, other_optimizer, other_scheduler, _ = make_training(hidden=256)
    hash_before = checkpoint.state_dict_sha256(other_model)

    with pytest.raises(CheckpointMismatchError) as raised:
        checkpoint.load(folder, other_model, other_optimizer, other_scheduler, run_id=RUN_ID)

    message = str(raised.value)
    assert "parameter fc1.weight has shape (128, 8) in the checkpoint but (256, 8) in the model" in message
    assert "parameter fc1.bias has shape (128,) in the checkpoint but (256,) in the model" in message
    assert "more differences" in message
    assert "run_name" in message
    assert "cdk.json" in message
    assert checkpoint.state_dict_sha256(other_model) == hash_before


def test_load_rejects_missing_and_retyped_tensors(tmp_path):
    model = make_model()
    with Checkpointer(tmp_path, RUN_ID, model) as saver:
        folder = saver.save(step=1, epoch=0)

    without_norm = nn.Sequential()
    without_norm.add_module("fc1", nn.Linear(8, 16))
    without_norm.add_module("fc2", nn.Linear(16, 3))
    with pytest.raises(CheckpointMismatchError, match="buffer norm.running_mean is in the checkpoint but not"):
        checkpoint.load(folder, without_norm)

    as_double = make_model().double()
    with pytest.raises(CheckpointMismatchError, match="fc1.bias has dtype torch.float32 in the checkpoint but torch.float64"):
        checkpoint.load(folder, as_double)


def test_load_rejects_other_run_id(tmp_path):
    model = make_model()
    with Checkpointer(tmp_path, RUN_ID, model) as saver:
        folder = saver.save(step=1, epoch=0)

    with pytest.raises(CheckpointMismatchError) as raised:
        checkpoint.load(folder, make_model(), run_id="run-b")

    assert "'run-a'" in str(raised.value)
    assert "'run-b'" in str(raised.value)
    assert "run_name" in str(raised.value)


# ---------------------------------------------------------------------------
# Torn checkpoints


def save_steps(checkpoint_dir: Path, steps: list[int]) -> None:
    model, optimizer, scheduler, _ = make_training()
    with Checkpointer(checkpoint_dir, RUN_ID, model, optimizer, scheduler) as saver:
        for step in steps:
            saver.save(step=step, epoch=0)


@pytest.mark.parametrize(
    "damage",
    ["manifest missing", "file truncated", "byte flipped", "file missing", "manifest malformed"],
)
def test_torn_checkpoint_never_chosen(tmp_path, damage):
    save_steps(tmp_path, [10, 20])
    newest = step_folder(tmp_path, 20)
    if damage == "manifest missing":
        (newest / contract.MANIFEST_NAME).unlink()
    elif damage == "file truncated":
        path = newest / checkpoint.OPTIMIZER_FILE
        os.truncate(path, path.stat().st_size // 2)
    elif damage == "byte flipped":
        path = newest / checkpoint.MODEL_FILE
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "file missing":
        (newest / checkpoint.TRAINER_FILE).unlink()
    else:
        (newest / contract.MANIFEST_NAME).write_text('{"format": 1, "step": 20')

    assert checkpoint.find_latest_checkpoint(tmp_path) == step_folder(tmp_path, 10)
    assert checkpoint.resolve_checkpoint(tmp_path) == step_folder(tmp_path, 10)
    with pytest.raises(CheckpointCorruptError, match="step-00000020"):
        checkpoint.load(newest, make_model())
    state = checkpoint.load(tmp_path, make_model(), run_id=RUN_ID)
    assert state.step == 10


def test_no_checkpoint_raises_not_found(tmp_path):
    with pytest.raises(checkpoint.CheckpointNotFoundError):
        checkpoint.load(tmp_path, make_model())
    with pytest.raises(checkpoint.CheckpointNotFoundError):
        checkpoint.load(tmp_path / "step-00000001", make_model())


SLOW_SAVE_SCRIPT = textwrap.dedent(
    """
    import os, sys, time, warnings
    warnings.filterwarnings("ignore")
    from pathlib import Path
    import torch
    from ml import checkpoint


    def writer_main(socket_fd):
        # Runs in the writer process, which gets the marker path from the environment.
        marker = Path(os.environ["SLOW_SAVE_MARKER"])
        write_file = checkpoint._write_file

        def slow_write_file(path, payload, *args):
            item = write_file(path, payload, *args)
            if path.parent.name == "step-00000002":
                marker.with_suffix(".pid").write_text(str(os.getpid()))
                marker.write_text(path.name)
                time.sleep(60)
            return item

        checkpoint._write_file = slow_write_file
        checkpoint._writer_main(socket_fd)


    if __name__ == "__main__":
        checkpoint.WRITER_ENTRY = ("slow_save", "writer_main")
        model = torch.nn.Linear(256, 256)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        saver = checkpoint.Checkpointer(sys.argv[1], "run-a", model, optimizer)
        saver.save(step=1, epoch=0)
        saver.wait()
        saver.save(step=2, epoch=0)
        saver.wait()
    """
)


def process_is_gone(pid: int) -> bool:
    """Return whether ``pid`` has exited (an unreaped zombie counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_sigkill_during_save_leaves_no_manifest(tmp_path):
    script = tmp_path / "slow_save.py"
    script.write_text(SLOW_SAVE_SCRIPT)
    checkpoint_dir = tmp_path / "checkpoints"
    marker = tmp_path / "first-file-written"
    process = subprocess.Popen(
        [sys.executable, str(script), str(checkpoint_dir), str(marker)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "SLOW_SAVE_MARKER": str(marker)},
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert marker.exists(), process.stderr.read().decode() if process.poll() is not None else "timed out"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=10)

    # The writer process dies with the trainer, so it cannot commit the torn folder later.
    writer_pid = int(marker.with_suffix(".pid").read_text())
    deadline = time.monotonic() + 10
    while not process_is_gone(writer_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process_is_gone(writer_pid), f"writer process {writer_pid} outlived the killed trainer"

    torn = step_folder(checkpoint_dir, 2)
    assert (torn / marker.read_text()).exists()
    assert not (torn / contract.MANIFEST_NAME).exists()
    assert not (torn / (contract.MANIFEST_NAME + ".tmp")).exists()
    assert contract.read_verified_manifest(step_folder(checkpoint_dir, 1)) is not None
    assert checkpoint.find_latest_checkpoint(checkpoint_dir) == step_folder(checkpoint_dir, 1)
    with pytest.raises(CheckpointCorruptError):
        checkpoint.load(torn, torch.nn.Linear(256, 256))


def test_killed_writer_restarts_on_next_save(tmp_path):
    model, optimizer, scheduler, _ = make_training()
    saver = Checkpointer(tmp_path, RUN_ID, model, optimizer, scheduler)
    saver.save(step=1, epoch=0)
    saver.wait()
    first_writer = saver.writer_pid

    os.kill(first_writer, signal.SIGKILL)
    # Reads private state: wait until the writer has exited, so that save() finds it exited.
    saver._writer.process.wait(timeout=10)
    saver.save(step=2, epoch=0)
    second_writer = saver.writer_pid
    result = saver.close()

    assert result.step == 2
    assert second_writer != first_writer
    assert saver.writer_pid is None
    assert contract.read_verified_manifest(step_folder(tmp_path, 2)) is not None


def test_writer_death_during_save_raises(tmp_path):
    model, optimizer, scheduler, _ = make_training()
    saver = Checkpointer(tmp_path, RUN_ID, model, optimizer, scheduler)
    saver.save(step=1, epoch=0)
    saver.wait()
    writer_pid = saver.writer_pid
    # Stop the writer, so that the next request stays unread until the writer is killed.
    os.kill(writer_pid, signal.SIGSTOP)
    saver.save(step=2, epoch=0)
    os.kill(writer_pid, signal.SIGKILL)

    with pytest.raises(CheckpointSaveError, match="exited"):
        saver.wait()
    assert contract.read_verified_manifest(step_folder(tmp_path, 2)) is None

    saver.save(step=2, epoch=0)
    saver.close()
    assert saver.writer_pid is None
    assert contract.read_verified_manifest(step_folder(tmp_path, 2)) is not None


def test_hurried_background_write_is_rewritten(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "WRITE_CHUNK_BYTES", 1024)
    threads = checkpoint._WriterThreads(connection=None)
    payload = {"weight": torch.arange(100_000, dtype=torch.float32)}
    background_priorities = []

    def hurry_at_second_chunk():
        background_priorities.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        if len(background_priorities) == 2:
            threads.hurry.set()
        if threads.hurry.is_set():
            raise checkpoint._Hurried()

    monkeypatch.setattr(threads, "_raise_if_hurried", hurry_at_second_chunk)
    path = tmp_path / checkpoint.MODEL_FILE
    item = threads._write_file(path, payload)

    assert background_priorities == [checkpoint.BACKGROUND_NICE] * 2
    assert item.size == path.stat().st_size
    assert item.sha256 == contract.sha256_file(path)
    assert torch.equal(torch.load(path, weights_only=True)["weight"], payload["weight"])


def test_files_reported_before_commit(tmp_path):
    model, optimizer, scheduler, _ = make_training()
    reported = []

    def on_file_written(path, item):
        reported.append((path.name, item, (path.parent / contract.MANIFEST_NAME).exists()))

    with Checkpointer(tmp_path, RUN_ID, model, optimizer, scheduler, on_file_written=on_file_written) as saver:
        saver.save(step=1, epoch=0)

    manifest = contract.read_verified_manifest(step_folder(tmp_path, 1))
    assert [name for name, _item, _committed in reported] == [item.name for item in manifest.files]
    assert [item for _name, item, _committed in reported] == list(manifest.files)
    assert not any(committed for _name, _item, committed in reported)


# ---------------------------------------------------------------------------
# Sampler, signals, progress


def test_sampler_permutation_depends_on_seed_and_epoch():
    sampler = DeterministicSampler(50, seed=3)
    other_seed = DeterministicSampler(50, seed=4)

    sampler.set_epoch(2)
    order = list(sampler)
    assert sorted(order) == list(range(50))
    assert order == DeterministicSampler(50, seed=3).permutation(2)
    assert order != sampler.permutation(1)
    assert order != other_seed.permutation(2)

    torch.manual_seed(0)
    first = sampler.permutation(5)
    torch.rand(100)  # the global RNG must not matter
    assert sampler.permutation(5) == first


def test_sampler_starts_at_position():
    sampler = DeterministicSampler(10, seed=0)

    sampler.set_epoch(1, start=4)

    assert list(sampler) == sampler.permutation(1)[4:]
    assert len(sampler) == 6
    with pytest.raises(ValueError):
        sampler.set_epoch(1, start=11)


def test_training_signals_set_flags_only():
    previous = signal.getsignal(signal.SIGUSR1)
    signals = TrainingSignals().install()
    try:
        assert not signals.should_save_now()
        assert not signals.should_save_and_exit()

        os.kill(os.getpid(), contract.SIGNAL_SAVE_AND_CONTINUE)
        assert signals.should_save_now()
        assert not signals.should_save_now()
        assert not signals.should_save_and_exit()

        os.kill(os.getpid(), contract.SIGNAL_SAVE_AND_EXIT)
        assert signals.should_save_and_exit()
        assert signals.should_save_and_exit()
    finally:
        signals.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == previous


def test_progress_writer_appends_flushed_lines(tmp_path):
    path = tmp_path / "logs" / "progress.jsonl"
    path.parent.mkdir()
    path.write_text('{"step": 0, "time": 1.0}\n')

    writer = ProgressWriter(path)
    writer.write(1, epoch=0, loss=0.5, lr=0.01)
    lines_before_close = path.read_text().splitlines()
    writer.write(2, epoch=0, loss=float("nan"), lr=0.01)
    writer.close()

    assert len(lines_before_close) == 2
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [record["step"] for record in records] == [0, 1, 2]
    assert records[1]["loss"] == 0.5
    assert records[1]["lr"] == 0.01
    assert abs(records[1]["time"] - time.time()) < 60
    assert records[2]["loss"] is None


def test_progress_writer_without_path_writes_nothing(tmp_path):
    writer = ProgressWriter(None)
    writer.write(1, loss=0.1)
    writer.close()
    assert list(tmp_path.iterdir()) == []
