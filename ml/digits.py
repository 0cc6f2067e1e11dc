"""Train a small CNN on the 8x8 handwritten digits: the sample job of spotrun.

Run it from the folder that contains ``ml/``::

    python -m ml.digits --epochs 15

It follows ``ml/contract.py`` and reads these environment variables:

* ``SPOTRUN_DATA_DIR``: folder with ``digits.csv.gz`` (default ``data/digits``).
* ``SPOTRUN_OUTPUT_DIR``: where ``model.pt`` and ``metrics.json`` go (default ``output/digits``).
* ``SPOTRUN_CHECKPOINT_DIR``: where step folders go (default ``checkpoints/digits``).
* ``SPOTRUN_RUN_ID``: run id stored in every checkpoint (default ``local``).
* ``SPOTRUN_RESUME_FROM``: a step folder, or a checkpoint directory to resume from its
  newest verified checkpoint. Empty or unset starts from scratch.
* ``SPOTRUN_PROGRESS_FILE``: JSON lines, one per step. Unset writes none.
* ``SPOTRUN_CHECKPOINT_EVERY``: steps between periodic checkpoints (default 0: none,
  only on SIGTERM or SIGUSR1).

With the same arguments on the CPU, a run that is stopped with SIGTERM and resumed
any number of times ends with the same weights, bit for bit, as an uninterrupted run.
Exit codes: 0 completed, 75 saved on request, 2 invalid input (arguments, environment,
data file, or a checkpoint that does not match), 1 any other error.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import logging
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml import contract

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("ml.digits")

DATA_FILE_NAME = "digits.csv.gz"
MODEL_FILE_NAME = "model.pt"
PIXELS = 64
CLASSES = 10
MAX_PIXEL_VALUE = 16
EXIT_INVALID_INPUT = 2
EXIT_ERROR = 1

# Arguments that change which samples each step trains on. A resume with other values would
# not continue the same run, so it is rejected. Model width is covered by the
# checkpoint's model signature.
TRAJECTORY_ARGUMENTS = ("seed", "batch_size", "val_fraction")


class DataError(Exception):
    """The data file is missing or malformed."""


class DeviceUnavailableError(Exception):
    """The requested device does not exist on this machine."""


@dataclass(frozen=True)
class Environment:
    """Settings that the bootstrap passes through environment variables."""

    run_id: str
    data_dir: Path
    output_dir: Path
    checkpoint_dir: Path
    resume_from: Path | None
    progress_file: Path | None
    checkpoint_every: int


# ---------------------------------------------------------------------------
# Arguments and environment


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a positive integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a positive integer")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected an integer >= 0") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected an integer >= 0")
    return value


def _bounded_float(low: float, high: float, include_low: bool) -> Any:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a number") from None
        above_low = value >= low if include_low else value > low
        if not (math.isfinite(value) and above_low and value < high):
            bracket = "[" if include_low else "("
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a number in {bracket}{low}, {high})")
        return value

    return parse


def _milestones(text: str) -> list[int]:
    if text.strip() == "":
        return []
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: expected comma-separated epoch numbers such as 8,12"
        ) from None
    if any(value <= 0 for value in values) or values != sorted(set(values)):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected increasing positive epoch numbers")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ml.digits",
        description="Train a small CNN on the 8x8 handwritten digits, with checkpoints per ml/contract.py.",
    )
    positive_float = _bounded_float(0.0, math.inf, include_low=False)
    non_negative_float = _bounded_float(0.0, math.inf, include_low=True)
    unit_interval = _bounded_float(0.0, 1.0, include_low=True)

    schedule = parser.add_argument_group("optimization")
    schedule.add_argument("--epochs", type=_positive_int, default=15, help="number of epochs (default: 15)")
    schedule.add_argument("--batch-size", type=_positive_int, default=32, help="samples per step (default: 32)")
    schedule.add_argument("--lr", type=positive_float, default=1e-3, help="initial learning rate (default: 0.001)")
    schedule.add_argument("--optimizer", choices=("adam", "sgd"), default="adam", help="optimizer (default: adam)")
    schedule.add_argument("--momentum", type=unit_interval, default=0.9, help="SGD momentum (default: 0.9)")
    schedule.add_argument(
        "--milestones",
        type=_milestones,
        default=[8, 12],
        help="comma-separated epochs after which the LR is multiplied by --gamma (default: 8,12)",
    )
    schedule.add_argument("--gamma", type=positive_float, default=0.1, help="LR factor at each milestone (default: 0.1)")

    model = parser.add_argument_group("model")
    model.add_argument("--channels", type=_positive_int, default=128, help="channels of the first conv layer (default: 128)")
    model.add_argument("--hidden", type=_positive_int, default=256, help="units of the hidden linear layer (default: 256)")
    model.add_argument("--dropout", type=unit_interval, default=0.25, help="dropout probability (default: 0.25)")

    data = parser.add_argument_group("data and run")
    data.add_argument(
        "--val-fraction",
        type=_bounded_float(0.0, 1.0, include_low=False),
        default=0.2,
        help="fraction of samples held out for validation (default: 0.2)",
    )
    data.add_argument(
        "--seed", type=_non_negative_int, default=0, help="seed of the split, init, sample order and dropout (default: 0)"
    )
    data.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="device to train on; auto picks cuda when available (default: auto)",
    )
    data.add_argument(
        "--step-delay",
        type=non_negative_float,
        default=0.0,
        help="seconds to sleep after each step, to stretch a run for interruption drills and tests (default: 0)",
    )
    return parser


def read_environment(environ: dict[str, str]) -> Environment:
    """Read the contract's environment variables; raise ValueError naming an invalid one."""
    every_text = environ.get(contract.ENV_CHECKPOINT_EVERY, "").strip() or "0"
    try:
        checkpoint_every = int(every_text)
    except ValueError:
        checkpoint_every = -1
    if checkpoint_every < 0:
        raise ValueError(f"invalid {contract.ENV_CHECKPOINT_EVERY}={every_text!r}: expected an integer >= 0")

    resume_text = environ.get(contract.ENV_RESUME_FROM, "").strip()
    progress_text = environ.get(contract.ENV_PROGRESS_FILE, "").strip()
    return Environment(
        run_id=environ.get(contract.ENV_RUN_ID, "").strip() or "local",
        data_dir=Path(environ.get(contract.ENV_DATA_DIR, "").strip() or "data/digits"),
        output_dir=Path(environ.get(contract.ENV_OUTPUT_DIR, "").strip() or "output/digits"),
        checkpoint_dir=Path(environ.get(contract.ENV_CHECKPOINT_DIR, "").strip() or "checkpoints/digits"),
        resume_from=Path(resume_text) if resume_text else None,
        progress_file=Path(progress_text) if progress_text else None,
        checkpoint_every=checkpoint_every,
    )


# ---------------------------------------------------------------------------
# Data and model


def load_digits(path: Path) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Read features (N, 1, 8, 8) scaled to [0, 1] and labels (N,) from the CSV file.

    Each line has 64 pixel values from 0 to 16 and then the label. Raises DataError
    naming the line of the first malformed value.
    """
    import torch

    pixels: list[list[int]] = []
    labels: list[int] = []
    try:
        with gzip.open(path, "rt", encoding="ascii", newline="") as handle:
            for line_number, row in enumerate(csv.reader(handle), start=1):
                if len(row) != PIXELS + 1:
                    raise DataError(f"{path}:{line_number}: expected {PIXELS + 1} values, found {len(row)}")
                try:
                    values = [int(value) for value in row]
                except ValueError:
                    raise DataError(f"{path}:{line_number}: expected integers") from None
                if not all(0 <= value <= MAX_PIXEL_VALUE for value in values[:PIXELS]):
                    raise DataError(f"{path}:{line_number}: pixel values must be in [0, {MAX_PIXEL_VALUE}]")
                if not 0 <= values[PIXELS] < CLASSES:
                    raise DataError(f"{path}:{line_number}: label {values[PIXELS]} is not in [0, {CLASSES - 1}]")
                pixels.append(values[:PIXELS])
                labels.append(values[PIXELS])
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"failed to read {path}: {error}") from error
    if not labels:
        raise DataError(f"{path} contains no samples")

    features = torch.tensor(pixels, dtype=torch.float32).reshape(-1, 1, 8, 8) / MAX_PIXEL_VALUE
    return features, torch.tensor(labels, dtype=torch.int64)


def split_indices(num_samples: int, val_fraction: float, seed: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Return (train, validation) index tensors of a fixed random split by ``seed``."""
    import torch

    generator = torch.Generator()
    generator.manual_seed(seed)
    order = torch.randperm(num_samples, generator=generator)
    val_count = max(1, round(num_samples * val_fraction))
    if val_count >= num_samples:
        raise DataError(f"--val-fraction {val_fraction} leaves no training samples out of {num_samples}")
    return order[val_count:], order[:val_count]


def build_model(channels: int, hidden: int, dropout: float) -> "torch.nn.Module":
    """Return a CNN: two 3x3 convolutions, 2x2 max pooling, then two linear layers."""
    from collections import OrderedDict

    from torch import nn

    return nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv2d(1, channels, kernel_size=3, padding=1)),
                ("relu1", nn.ReLU()),
                ("conv2", nn.Conv2d(channels, 2 * channels, kernel_size=3, padding=1)),
                ("relu2", nn.ReLU()),
                ("pool", nn.MaxPool2d(2)),
                ("flatten", nn.Flatten()),
                ("dropout1", nn.Dropout(dropout)),
                ("fc1", nn.Linear(2 * channels * 4 * 4, hidden)),
                ("relu3", nn.ReLU()),
                ("dropout2", nn.Dropout(dropout)),
                ("fc2", nn.Linear(hidden, CLASSES)),
            ]
        )
    )


def evaluate(model: "torch.nn.Module", features: "torch.Tensor", labels: "torch.Tensor") -> tuple[float, float]:
    """Return (mean cross-entropy loss, accuracy) of the model on the samples."""
    import torch
    from torch.nn import functional

    model.eval()
    with torch.no_grad():
        logits = model(features)
        loss = functional.cross_entropy(logits, labels).item()
        accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
    model.train()
    return loss, accuracy


# ---------------------------------------------------------------------------
# Training


def _write_atomically(path: Path, write: Any) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _check_trajectory_arguments(saved: dict, args: argparse.Namespace, folder: Path) -> None:
    from ml.checkpoint import CheckpointMismatchError

    for name in TRAJECTORY_ARGUMENTS:
        if name in saved and saved[name] != getattr(args, name):
            option = "--" + name.replace("_", "-")
            raise CheckpointMismatchError(
                f"checkpoint {folder} was trained with {option} {saved[name]}, but this process "
                f"was started with {option} {getattr(args, name)}. Resume with the checkpoint's "
                "value or start a new run."
            )


def select_device(requested: str, local_rank: int = 0) -> "torch.device":
    """Return the device for ``--device`` and prepare it for deterministic algorithms.

    Under torchrun each process on an instance takes the GPU of its ``local_rank``.
    """
    import torch

    if requested == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif requested == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError("--device cuda was given but CUDA is not available; use --device cpu or auto")
    else:
        device = torch.device(requested)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DeviceUnavailableError(
                f"local rank {local_rank} has no GPU: this instance has {torch.cuda.device_count()}; "
                "set gpus_per_node in cdk.json to at most that number, or 0 to use every GPU"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # cuBLAS needs this setting for deterministic results, and it takes effect
        # only when set before the first cuBLAS call.
        # NOTE: training on CUDA has not been run yet; only the CPU results are tested.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return device


def build_optimizer(model: "torch.nn.Module", args: argparse.Namespace) -> tuple[Any, Any]:
    """Return the optimizer and the MultiStepLR scheduler chosen by the arguments."""
    import torch

    if args.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.milestones, gamma=args.gamma)
    return optimizer, scheduler


def write_outputs(output_dir: Path, model: "torch.nn.Module", metrics: dict) -> None:
    """Write model.pt and then metrics.json, each by an atomic rename."""
    import torch

    output_dir.mkdir(parents=True, exist_ok=True)
    state_dict = {name: tensor.cpu() for name, tensor in model.state_dict().items()}
    _write_atomically(output_dir / MODEL_FILE_NAME, lambda handle: torch.save(state_dict, handle))
    text = json.dumps(metrics, indent=2, sort_keys=True)
    _write_atomically(output_dir / contract.METRICS_NAME, lambda handle: handle.write(text.encode("utf-8")))


def train(args: argparse.Namespace, env: Environment, signals: Any) -> int:
    """Run training to completion or until SIGTERM, and return the exit code.

    Under torchrun the ranks train data-parallel with DDP: each step's global batch is
    the same as in a single process, and each rank computes the loss of its share.
    """
    from ml import distributed

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(args.device, local_rank)
    try:
        info = distributed.init_process_group(device, dict(os.environ))
        return _train(args, env, signals, device, info)
    except distributed.PeerLostError as error:
        return distributed.exit_code_for(error)


def _close_after_peer_loss(checkpointer: Any) -> None:
    """Let a save that is in flight finish, because it contains a consistent earlier step."""
    from ml.checkpoint import CheckpointSaveError

    try:
        checkpointer.close()
    except CheckpointSaveError as error:
        logger.error("the checkpoint in flight when the peer was lost failed: %s", error)


def _train(args: argparse.Namespace, env: Environment, signals: Any, device: "torch.device", info: Any) -> int:
    import torch
    from torch.nn import functional

    from ml import checkpoint, distributed

    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)

    features, labels = load_digits(env.data_dir / DATA_FILE_NAME)
    train_index, val_index = split_indices(len(labels), args.val_fraction, args.seed)
    train_features, train_labels = features[train_index].to(device), labels[train_index].to(device)
    val_features, val_labels = features[val_index].to(device), labels[val_index].to(device)

    model = build_model(args.channels, args.hidden, args.dropout).to(device)
    optimizer, scheduler = build_optimizer(model, args)
    sampler = checkpoint.DeterministicSampler(len(train_labels), seed=args.seed)
    checkpointer = checkpoint.Checkpointer(env.checkpoint_dir, env.run_id, model, optimizer, scheduler)
    progress = checkpoint.ProgressWriter(env.progress_file if info.writes_files else None)
    steps_per_epoch = math.ceil(len(train_labels) / args.batch_size)
    config = {name: getattr(args, name) for name in TRAJECTORY_ARGUMENTS}
    distributed.seed_rank(args.seed, info)

    step, epoch, position, last_loss = 0, 0, 0, math.nan
    resumed_step = None
    if env.resume_from is not None:
        state = checkpointer.load(env.resume_from)
        _check_trajectory_arguments(state.extra.get("config", {}), args, state.folder)
        if info.is_distributed:
            distributed.restore_rank_rng_state(state.extra.get("rank_rng_states"), info, args.seed)
        step, epoch, position = state.step, state.epoch, state.position
        resumed_step = step
        last_loss = float(state.extra.get("last_loss", math.nan))
        logger.info("resumed from step %d (epoch %d, sample %d) of %s", step, epoch, position, state.folder)
    distributed.check_same_resume_step(resumed_step, info)
    first_step = step
    # DDP broadcasts rank 0's parameters when it wraps the model. After a resume every
    # rank already has the same ones.
    trained = model
    if info.is_distributed:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    logger.info(
        "starting run %s on %s: %d training and %d validation samples, %d steps per epoch, "
        "%d epochs, first step %d, %d process(es)",
        env.run_id,
        device,
        len(train_labels),
        len(val_labels),
        steps_per_epoch,
        args.epochs,
        step + 1,
        info.world_size,
    )

    def save() -> None:
        extra = {"config": config, "last_loss": last_loss}
        if info.is_distributed:
            extra["rank_rng_states"] = distributed.gather_rng_states(info)
        if info.writes_files:
            checkpointer.save(step, epoch, position, extra=extra)

    model.train()
    loop_started = time.monotonic()
    try:
        while epoch < args.epochs:
            sampler.set_epoch(epoch, start=position)
            for batch in torch.utils.data.BatchSampler(sampler, args.batch_size, drop_last=False):
                # Step boundary: the state is consistent here, so act on signals now. Under
                # torchrun every rank acts on a request that any rank received.
                save_and_exit, save_now = distributed.agree_on_requests(
                    signals.should_save_and_exit(), signals.should_save_now(), info, device
                )
                if save_and_exit:
                    logger.info("received SIGTERM: saving step %d and exiting", step)
                    save()
                    checkpointer.close()
                    progress.close()
                    # Every rank stops at this step, so they can leave the group together.
                    distributed.leave_process_group(info, device)
                    return contract.EXIT_SAVED
                if save_now:
                    logger.info("received SIGUSR1: saving step %d", step)
                    save()

                learning_rate = optimizer.param_groups[0]["lr"]
                optimizer.zero_grad(set_to_none=True)
                if info.is_distributed:
                    # DDP averages gradients over ranks, so scaling the sum of this rank's
                    # losses by world_size / batch size gives the gradient of the batch mean.
                    batch_index = torch.tensor(distributed.local_slice(batch, info), dtype=torch.int64, device=device)
                    loss_sum = functional.cross_entropy(
                        trained(train_features[batch_index]), train_labels[batch_index], reduction="sum"
                    )
                    (loss_sum * (info.world_size / len(batch))).backward()
                    optimizer.step()
                    last_loss = distributed.all_reduce_sum(loss_sum.item(), info, device) / len(batch)
                else:
                    batch_index = torch.tensor(batch, device=device)
                    loss = functional.cross_entropy(model(train_features[batch_index]), train_labels[batch_index])
                    loss.backward()
                    optimizer.step()
                    last_loss = loss.item()

                step_epoch = epoch
                step += 1
                position += len(batch)
                if position == len(train_labels):
                    scheduler.step()
                    epoch += 1
                    position = 0
                progress.write(step, epoch=step_epoch, loss=last_loss, lr=learning_rate,
                               total_steps=steps_per_epoch * args.epochs)
                if env.checkpoint_every and step % env.checkpoint_every == 0:
                    save()
                if args.step_delay:
                    time.sleep(args.step_delay)
    except RuntimeError as error:
        # DDP all-reduces gradients inside backward(), so a dead or hung peer surfaces
        # there as well as in the explicit collectives.
        if not (info.is_distributed and distributed.is_collective_error(error)):
            raise
        _close_after_peer_loss(checkpointer)
        raise distributed.PeerLostError(f"a collective failed: {error}") from error
    except distributed.PeerLostError:
        _close_after_peer_loss(checkpointer)
        raise

    loop_seconds = time.monotonic() - loop_started
    checkpointer.close()
    progress.close()
    val_loss, val_accuracy = evaluate(model, val_features, val_labels)
    steps_run = step - first_step
    metrics = {
        "run_id": env.run_id,
        "final_step": step,
        # None (JSON null) only when resuming a checkpoint without a recorded loss.
        "final_loss": last_loss if math.isfinite(last_loss) else None,
        "final_weights_sha256": checkpoint.state_dict_sha256(model),
        "val_loss": val_loss,
        "val_accuracy": val_accuracy,
        "epochs": args.epochs,
        "world_size": info.world_size,
        "steps_this_process": steps_run,
        "training_seconds_this_process": loop_seconds,
    }
    if info.writes_files:
        write_outputs(env.output_dir, model, metrics)
    logger.info(
        "done: step %d, validation accuracy %.4f, %d steps in %.1f s (%.1f steps/s), outputs in %s",
        step,
        val_accuracy,
        steps_run,
        loop_seconds,
        steps_run / loop_seconds if loop_seconds > 0 else 0.0,
        env.output_dir,
    )
    distributed.leave_process_group(info, device)
    return contract.EXIT_COMPLETED


# ---------------------------------------------------------------------------
# Entry point


def _record_signals_until_installed() -> list[int]:
    """Record the contract's signals in a list until the real handlers replace these.

    Importing torch takes seconds, and the default SIGTERM action would end the process
    with a crash exit code instead of ``EXIT_SAVED``.
    """
    received: list[int] = []
    for signal_number in (contract.SIGNAL_SAVE_AND_EXIT, contract.SIGNAL_SAVE_AND_CONTINUE):
        signal.signal(signal_number, lambda number, frame: received.append(number))
    return received


def main(argv: list[str] | None = None) -> int:
    received_early = _record_signals_until_installed()
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )

    try:
        env = read_environment(dict(os.environ))
    except ValueError as error:
        logger.error("%s", error)
        return EXIT_INVALID_INPUT
    data_file = env.data_dir / DATA_FILE_NAME
    if not data_file.is_file():
        logger.error(
            "data file not found: %s (set %s to the folder that contains %s)",
            data_file,
            contract.ENV_DATA_DIR,
            DATA_FILE_NAME,
        )
        return EXIT_INVALID_INPUT

    # torch warns at import when NumPy is missing, but nothing here needs NumPy.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    from ml import checkpoint, distributed

    try:
        distributed.collective_timeout(dict(os.environ))
    except ValueError as error:
        logger.error("%s", error)
        return EXIT_INVALID_INPUT
    signals = checkpoint.TrainingSignals().install()
    for signal_number in received_early:
        if signal_number == contract.SIGNAL_SAVE_AND_EXIT:
            signals.request_save_and_exit()
        else:
            signals.request_save()

    try:
        code = train(args, env, signals)
        if code in (contract.EXIT_SAVED, contract.EXIT_PEER_LOST) and distributed.launched_by_torchrun(
            dict(os.environ)
        ):
            # After a lost peer the process group's threads still wait for it, and
            # tearing them down at interpreter exit aborts the process (SIGABRT). After a
            # save, torchrun sends SIGTERM to the processes still running once the first
            # one exits, and Python restores the default SIGTERM action while it shuts
            # down. Everything worth keeping is written, so leave at once.
            logging.shutdown()
            os._exit(code)
        return code
    except (
        DataError,
        DeviceUnavailableError,
        checkpoint.CheckpointMismatchError,
        checkpoint.CheckpointNotFoundError,
        checkpoint.CheckpointCorruptError,
    ) as error:
        logger.error("%s", error)
        return EXIT_INVALID_INPUT
    except checkpoint.CheckpointSaveError as error:
        logger.error("%s", error)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
