"""The supervisor: one instance's part of a run, from lease to shutdown.

It owns every write to the run's S3 prefix and every capacity change; the training
process only writes local files (see ml/contract.py).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from bootstrap import aws
from bootstrap.config import RunConfig
from bootstrap.imds import (
    ImdsClient,
    ImdsError,
    InstanceIdentity,
    NoticeWatcher,
    RebalanceRecommendation,
    SpotInstanceAction,
)
from bootstrap.reporting import (
    Notifier,
    RunContextFilter,
    TrainerLogForwarder,
    flush_handlers,
    instance_hours,
    latest_spot_price,
    start_cloudwatch_logs,
)
from bootstrap.store import Lease, LeaseLostError, RunStore, fetch_data
from bootstrap.trainer import ProgressReader, TrainerProcess
from ml import contract
from ml.contract import parse_step_folder

log = logging.getLogger("spotrun.supervisor")

TICK_S = 0.2
# Status writes renew the lease too, so they happen well within the lease TTL.
STATUS_EVERY_S = 5.0
# Upload of the interruption checkpoint must finish this long before the notice time.
NOTICE_SAFETY_MARGIN_S = 2.0
# Time to save and commit a checkpoint when the operating system shuts down (SIGTERM).
# systemd waits 90 s by default before it kills the remaining processes.
SHUTDOWN_SAVE_S = 60.0
# Exit codes of `python -m bootstrap`.
EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_INTERRUPTED = 3
EXIT_LEASE_BUSY = 4


@dataclass
class Counters:
    """Run-wide counts kept in status.json across instances."""

    instances_launched: int = 0
    interruptions: int = 0
    crashes: int = 0
    bootstrap_crashes: int = 0
    started_at: float = field(default_factory=time.time)


class RunEnded(Exception):
    """Raised inside the supervisor to leave the main loop with an exit code."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(exit_code)
        self.exit_code = exit_code


class Supervisor:
    def __init__(self, config: RunConfig, imds: ImdsClient, identity: InstanceIdentity,
                 work_dir: Path, code_dir: Path) -> None:
        self.config = config
        self.imds = imds
        self.identity = identity
        self.work_dir = work_dir
        self.code_dir = code_dir
        session = aws.make_session(config.region)
        self.s3 = aws.client(session, "s3")
        self.autoscaling = aws.client(session, "autoscaling")
        self.store = RunStore(self.s3, config.bucket, config.run_id)
        self.notices = NoticeWatcher(imds)
        self.logs_client = aws.client(session, "logs")
        self.ec2 = aws.client(session, "ec2")
        self.notifier = Notifier(aws.client(session, "sns"), config.topic_arn, config.run_id)

        self.checkpoint_dir = work_dir / "checkpoints"
        self.data_dir = work_dir / "data"
        self.output_dir = work_dir / "output"
        self.progress_path = work_dir / "progress.jsonl"
        self.progress = ProgressReader(self.progress_path)
        self.log_context = RunContextFilter(config.run_id, identity.instance_id,
                                            lambda: self.progress.step)
        self._log_handlers: list = []
        self.trainer_logs: TrainerLogForwarder | None = None
        self._progress_uploaded_size = 0
        self.counters = Counters()
        self.state = "starting"
        self.lease: Lease | None = None
        self._lease_lock = threading.Lock()
        self._uploader = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="checkpoint-upload")
        self._uploads: list[concurrent.futures.Future] = []
        self._submitted_steps: set[int] = set()
        self.committed_step: int | None = None
        self.resumed_from: int | None = None
        self.trainer: TrainerProcess | None = None
        self._last_status = 0.0
        self._last_poll = 0.0
        self._last_progress_at = time.monotonic()
        self._committed_at_trainer_start: int | None = None
        self.restarts_without_progress = 0
        self._shutdown_requested = threading.Event()

    def request_shutdown(self) -> None:
        """Ask for a save and a clean end; called from the SIGTERM handler at power-off."""
        self._shutdown_requested.set()

    # Entry point ---------------------------------------------------------------------

    def run(self) -> int:
        if self.config.log_group:
            self._log_handlers = start_cloudwatch_logs(self.logs_client, self.config.log_group,
                                                       self.log_context)
            self.trainer_logs = TrainerLogForwarder(self.logs_client, self.config.log_group,
                                                    self.log_context,
                                                    self.work_dir / "trainer.log")
        try:
            self._start()
            self._prepare()
            self._train()
        except RunEnded as ended:
            return ended.exit_code
        except LeaseLostError as error:
            # Another instance owns the run now: stop at once and write nothing more.
            log.error("%s; stopping the trainer without further writes", error)
            if self.trainer is not None:
                self.trainer.kill()
            return EXIT_LEASE_BUSY
        finally:
            self._uploader.shutdown(wait=False, cancel_futures=True)
            if self.trainer_logs is not None:
                self.trainer_logs.forward_new_lines()
                flush_handlers([self.trainer_logs.handler] if self.trainer_logs.handler else [])
            self.notifier.wait()
            flush_handlers(self._log_handlers)
        return EXIT_OK

    # Start-up --------------------------------------------------------------------------

    def _start(self) -> None:
        if self.store.is_done():
            log.info("run %s is already complete (DONE exists); nothing to do",
                     self.config.run_id)
            self._set_capacity_zero()
            raise RunEnded(EXIT_OK)
        self._acquire_lease()
        status = self.store.read_status() or {}
        self.counters = Counters(**{name: status[name] for name in vars(Counters())
                                    if name in status})
        self.counters.instances_launched += 1
        self.committed_step = status.get("committed_step")
        if self.lease.taken_over_from and status.get("state") not in ("interrupting",
                                                                      "interrupted"):
            # The previous holder neither finished nor handled a notice: its supervisor
            # died (or its instance vanished) without releasing the lease.
            self.counters.bootstrap_crashes += 1
            self.store.append_event("previous_instance_lost", self.identity.instance_id,
                                    previous_instance_id=self.lease.taken_over_from,
                                    previous_state=status.get("state"))
        if self.counters.bootstrap_crashes > self.config.max_crash_restarts:
            self._finish_failed(
                "bootstrap_crash_budget_spent",
                f"the supervisor crashed on {self.counters.bootstrap_crashes} instances; "
                f"the budget max_crash_restarts is {self.config.max_crash_restarts}")
        self.store.append_event("instance_started", self.identity.instance_id,
                                instance_type=self.identity.instance_type,
                                availability_zone=self.identity.availability_zone,
                                lease_generation=self.lease.generation)
        self._write_status(force=True)
        if self._runtime_exceeded():
            self._finish_stopped("maximum run time reached before this instance started")

    def _acquire_lease(self) -> None:
        """Wait for the run lease; give up after it would have gone stale twice."""
        ttl = self.config.lease_ttl_seconds
        deadline = time.monotonic() + 2 * ttl
        while True:
            self.lease = self.store.try_acquire_lease(self.identity.instance_id, ttl)
            if self.lease is not None:
                log.info("holding run lease generation %d", self.lease.generation)
                return
            if self.store.is_done():
                log.info("run %s completed while this instance waited for the lease",
                         self.config.run_id)
                raise RunEnded(EXIT_OK)
            if time.monotonic() > deadline:
                log.error("the run lease is held by another instance; exiting without "
                          "training")
                raise RunEnded(EXIT_LEASE_BUSY)
            self._check_notices_during_start("waiting for the run lease")
            time.sleep(min(2.0, ttl / 4))

    def _prepare(self) -> None:
        started = time.monotonic()
        self.state = "downloading"
        count = fetch_data(self.s3, zip_uri=self.config.data_zip_uri,
                           prefix_uri=self.config.data_prefix_uri,
                           destination=self.data_dir)
        log.info("training data: %d files in %.2f s", count, time.monotonic() - started)
        self._check_notices_during_start("downloading the training data")

        manifest = self.store.download_newest_checkpoint(self.checkpoint_dir)
        where = f"{self.identity.instance_id} ({self.identity.instance_type}, " \
                f"{self.identity.availability_zone})"
        if manifest is not None:
            self.resumed_from = manifest.step
            self.committed_step = manifest.step
            self._submitted_steps.add(manifest.step)
            self.store.append_event("resumed", self.identity.instance_id,
                                    step=manifest.step, epoch=manifest.epoch)
            self.notifier.publish(f"resumed from step {manifest.step}",
                                  [f"Resumed from checkpoint step {manifest.step} on {where}.",
                                   f"Interruptions so far: {self.counters.interruptions}."])
        else:
            self.notifier.publish("started", [f"Training started on {where}."])
        self._check_notices_during_start("downloading the checkpoint")
        self.output_dir.mkdir(parents=True, exist_ok=True)

    def _check_notices_during_start(self, phase: str) -> None:
        if self._shutdown_requested.is_set():
            log.warning("the instance is shutting down while %s; ending cleanly", phase)
            if self.lease is None:
                raise RunEnded(EXIT_INTERRUPTED)
            self.counters.interruptions += 1
            self.store.append_event("interruption_notice", self.identity.instance_id,
                                    action="shutdown", phase=phase,
                                    step_at_notice=self.committed_step,
                                    notice_time=time.time())
            self._end_interrupted(self.committed_step)
        for notice in self._poll_notices():
            if isinstance(notice, SpotInstanceAction):
                log.warning("spot %s notice while %s; ending this instance cleanly",
                            notice.action, phase)
                if self.lease is None:
                    raise RunEnded(EXIT_INTERRUPTED)
                self.counters.interruptions += 1
                self.store.append_event("interruption_notice", self.identity.instance_id,
                                        action=notice.action, phase=phase,
                                        step_at_notice=self.committed_step,
                                        notice_time=notice.time.timestamp())
                self._end_interrupted(self.committed_step)

    # Training --------------------------------------------------------------------------

    def _trainer_env(self) -> dict[str, str]:
        env = dict(os.environ)
        resume = ""
        newest = self._newest_local_checkpoint()
        if newest is not None:
            resume = str(newest[1])
        env.update({
            contract.ENV_RUN_ID: self.config.run_id,
            contract.ENV_CHECKPOINT_DIR: str(self.checkpoint_dir),
            contract.ENV_RESUME_FROM: resume,
            contract.ENV_DATA_DIR: str(self.data_dir),
            contract.ENV_OUTPUT_DIR: str(self.output_dir),
            contract.ENV_PROGRESS_FILE: str(self.progress_path),
            contract.ENV_CHECKPOINT_EVERY: str(self.config.checkpoint_every_steps),
        })
        return env

    def _start_trainer(self) -> None:
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.trainer = TrainerProcess(self.config.train_command, env=self._trainer_env(),
                                      cwd=self.code_dir,
                                      log_path=self.work_dir / "trainer.log")
        self.state = "training"
        self._last_progress_at = time.monotonic()
        self._committed_at_trainer_start = self.committed_step

    def _train(self) -> None:
        self._start_trainer()
        while True:
            self._tick()
            code = self.trainer.poll()
            if code is not None:
                self._on_trainer_exit(code)
            time.sleep(TICK_S)

    def _tick(self) -> None:
        if self._shutdown_requested.is_set():
            self._on_shutdown()
        if self.progress.read_new():
            self._last_progress_at = time.monotonic()
        if self.trainer_logs is not None:
            self.trainer_logs.forward_new_lines()
        self._check_heartbeat()
        self._upload_new_checkpoints()
        now = time.monotonic()
        if now - self._last_poll >= self.config.poll_interval_seconds:
            self._last_poll = now
            for notice in self._poll_notices():
                self._on_notice(notice)
        self._write_status()
        if self._runtime_exceeded():
            self._stop_for_max_runtime()

    def _check_heartbeat(self) -> None:
        """Kill a trainer that reported no step for heartbeat_timeout_seconds."""
        silent_s = time.monotonic() - self._last_progress_at
        if silent_s <= self.config.heartbeat_timeout_seconds or self.trainer.poll() is not None:
            return
        log.error("trainer reported no step for %.0f s (heartbeat_timeout_seconds is %.0f);"
                  " killing it as hung", silent_s, self.config.heartbeat_timeout_seconds)
        self.trainer.kill()
        self._on_trainer_exit(self.trainer.poll(), hung=True)

    def _on_trainer_exit(self, code: int, hung: bool = False) -> None:
        if self._shutdown_requested.is_set():
            # The trainer got the shutdown's SIGTERM too and may already have saved.
            self._on_shutdown()
        self.progress.read_new()
        if code == contract.EXIT_COMPLETED and not hung:
            self._finish_completed()
        self.counters.crashes += 1
        tail = self.trainer.tail()
        cause = "hung" if hung else f"exit code {code}"
        log.error("trainer crashed (%s): crash %d, budget max_crash_restarts %d", cause,
                  self.counters.crashes, self.config.max_crash_restarts)
        self._wait_for_uploads(timeout=None)
        if self.committed_step == self._committed_at_trainer_start:
            self.restarts_without_progress += 1
        else:
            self.restarts_without_progress = 0
        self.store.append_event("trainer_crash", self.identity.instance_id,
                                exit_code=code, hung=hung, step=self.progress.step,
                                committed_step=self.committed_step,
                                restarts_without_progress=self.restarts_without_progress,
                                log_tail=tail[-10:])
        if self.counters.crashes > self.config.max_crash_restarts:
            self._finish_failed(
                "crash_budget_spent",
                f"trainer crashed {self.counters.crashes} times (last: {cause}); "
                f"the budget max_crash_restarts is {self.config.max_crash_restarts}",
                log_tail=tail)
        if self.restarts_without_progress >= self.config.max_restarts_without_progress:
            self._finish_failed(
                "no_progress",
                f"{self.restarts_without_progress} trainer restarts in a row made no "
                f"progress (committed step stayed at {self.committed_step}; last: {cause}); "
                f"max_restarts_without_progress is {self.config.max_restarts_without_progress}",
                log_tail=tail)
        log.info("restarting the trainer in place")
        self._start_trainer()

    # Notices ---------------------------------------------------------------------------

    def _poll_notices(self) -> list:
        try:
            return self.notices.poll()
        except ImdsError as error:
            # The client already retried with backoff; the next poll tries again.
            log.warning("could not read spot notices from IMDS: %s", error)
            return []

    def _on_notice(self, notice) -> None:
        if isinstance(notice, RebalanceRecommendation):
            log.warning("rebalance recommendation: asking the trainer for a checkpoint")
            self.store.append_event("rebalance_recommendation", self.identity.instance_id,
                                    step=self.progress.step)
            self.trainer.send(contract.SIGNAL_SAVE_AND_CONTINUE)
            return
        # The poll may have taken seconds (slow IMDS): read the step the trainer is at now.
        self.progress.read_new()
        step_at_notice = self.progress.step
        self.counters.interruptions += 1
        log.warning("spot %s notice for %s at step %s", notice.action,
                    notice.time.isoformat(), step_at_notice)
        self.store.append_event("interruption_notice", self.identity.instance_id,
                                action=notice.action, step_at_notice=step_at_notice,
                                notice_time=notice.time.timestamp())
        self.state = "interrupting"
        self._write_status(force=True)
        deadline = notice.time.timestamp() - NOTICE_SAFETY_MARGIN_S
        if self._save_and_stop_trainer(deadline) == contract.EXIT_COMPLETED:
            # Training ended before the trainer saw the request: finish the run now. If
            # the instance is reclaimed first, the next one resumes and repeats the end.
            log.warning("the trainer completed during the notice window; finishing the run")
            self._finish_completed()
        self._end_interrupted(step_at_notice)

    def _on_shutdown(self) -> None:
        """Save, commit and release the lease when the operating system shuts down.

        An instance can be terminated without a spot notice: by the group (capacity
        changed, rebalancing), by the in-account maximum run time schedule or by hand.
        The run goes on from this checkpoint on the next instance, if the group has one.
        """
        self.progress.read_new()
        step = self.progress.step
        log.warning("the instance is shutting down at step %s; saving a checkpoint", step)
        self.counters.interruptions += 1
        self.store.append_event("interruption_notice", self.identity.instance_id,
                                action="shutdown", step_at_notice=step,
                                notice_time=time.time() + SHUTDOWN_SAVE_S)
        self.state = "interrupting"
        if self._save_and_stop_trainer(time.time() + SHUTDOWN_SAVE_S) == contract.EXIT_COMPLETED:
            self._finish_completed()
        self._end_interrupted(step)

    def _save_and_stop_trainer(self, deadline: float) -> int | None:
        """Ask the trainer to save and exit, then commit its checkpoint before deadline.

        Returns the trainer's exit code, or None when the deadline passed first: then the
        trainer is killed and the previous committed checkpoint stays the latest, so
        nothing partial is published.
        """
        self.trainer.send(contract.SIGNAL_SAVE_AND_EXIT)
        while self.trainer.poll() is None and time.time() < deadline:
            self.progress.read_new()
            time.sleep(TICK_S / 2)
        self.progress.read_new()
        if self.trainer.poll() is None:
            log.error("trainer did not save before the notice deadline; killing it")
            self.trainer.kill()
            return None
        self._upload_new_checkpoints()
        self._wait_for_uploads(timeout=max(0.0, deadline - time.time()))
        return self.trainer.poll()

    def _end_interrupted(self, step_at_notice: int | None) -> None:
        last_step = self.progress.step if self.progress.step is not None else step_at_notice
        checkpoint_step = self.committed_step
        steps_lost = None
        if last_step is not None:
            steps_lost = max(0, last_step - (checkpoint_step or 0))
        self.store.append_event("interruption_checkpoint", self.identity.instance_id,
                                step_at_notice=step_at_notice, checkpoint_step=checkpoint_step,
                                last_step=last_step, steps_lost=steps_lost)
        self.state = "interrupted"
        self._write_status(force=True)
        self._release_lease()
        self.notifier.publish(
            f"interrupted at step {step_at_notice}",
            [f"Spot interruption notice for {self.identity.instance_id} at step "
             f"{step_at_notice}.",
             f"Checkpoint committed for it: step {checkpoint_step}; steps lost: {steps_lost}.",
             "The group launches a replacement, which resumes from that checkpoint."])
        raise RunEnded(EXIT_INTERRUPTED)

    # Checkpoint upload -----------------------------------------------------------------

    def _newest_local_checkpoint(self) -> tuple[int, Path] | None:
        for step, folder in reversed(contract.committed_local_checkpoints(self.checkpoint_dir)):
            if contract.read_verified_manifest(folder) is not None:
                return step, folder
        return None

    def _upload_new_checkpoints(self) -> None:
        for step, folder in contract.committed_local_checkpoints(self.checkpoint_dir):
            if step in self._submitted_steps:
                continue
            if self.committed_step is not None and step <= self.committed_step:
                continue
            self._submitted_steps.add(step)
            self._uploads.append(self._uploader.submit(self._upload_one, folder))

    def _upload_one(self, folder: Path) -> None:
        # The trainer hashed each file as it committed the folder; checking sizes here
        # saves reading the checkpoint twice, and resume checks every hash.
        manifest = contract.read_verified_manifest(folder, check_hashes=False)
        if manifest is None:
            log.error("local checkpoint %s does not verify; not uploading it", folder.name)
            self._submitted_steps.discard(parse_step_folder(folder.name))
            return
        with self._lease_lock:
            self.lease = self.store.upload_checkpoint(folder, manifest, self.lease)
        self.committed_step = manifest.step
        self.store.append_event("checkpoint_committed", self.identity.instance_id,
                                step=manifest.step, epoch=manifest.epoch,
                                bytes=sum(item.size for item in manifest.files))
        self.store.prune_checkpoints(self.config.keep_checkpoints)
        self._prune_local(keep_step=manifest.step)

    def _prune_local(self, keep_step: int) -> None:
        for step, folder in contract.committed_local_checkpoints(self.checkpoint_dir):
            if step < keep_step:
                for path in folder.iterdir():
                    path.unlink()
                folder.rmdir()

    def _wait_for_uploads(self, timeout: float | None) -> bool:
        """Wait for queued uploads; re-raise an upload error; return False on timeout."""
        done, not_done = concurrent.futures.wait(self._uploads, timeout=timeout)
        for future in done:
            error = future.exception()
            if isinstance(error, LeaseLostError):
                log.error("%s; stopping without further writes", error)
                if self.trainer is not None:
                    self.trainer.kill()
                raise RunEnded(EXIT_LEASE_BUSY)
            if error is not None:
                raise error
        self._uploads = list(not_done)
        if not_done:
            log.error("%d checkpoint upload(s) still running at the deadline", len(not_done))
        return not not_done

    # Status and lease ------------------------------------------------------------------

    def _write_status(self, force: bool = False, **extra) -> None:
        now = time.monotonic()
        interval = min(STATUS_EVERY_S, self.config.lease_ttl_seconds / 4)
        if not force and now - self._last_status < interval:
            return
        self._last_status = now
        with self._lease_lock:
            self.lease = self.store.renew_lease(self.lease)
        latest = self.progress.latest or {}
        status = {
            "run_id": self.config.run_id,
            "state": self.state,
            "step": latest.get("step"),
            "epoch": latest.get("epoch"),
            "loss": latest.get("loss"),
            "committed_step": self.committed_step,
            "resumed_from": self.resumed_from,
            "instance_id": self.identity.instance_id,
            "instance_type": self.identity.instance_type,
            "availability_zone": self.identity.availability_zone,
            "updated_at": time.time(),
            **vars(self.counters),
            **extra,
        }
        self.store.write_status(status)
        self._upload_progress()

    def _upload_progress(self) -> None:
        try:
            size = self.progress_path.stat().st_size
        except FileNotFoundError:
            return
        if size != self._progress_uploaded_size:
            self.store.upload_progress(self.identity.instance_id, self.progress_path)
            self._progress_uploaded_size = size

    def _release_lease(self) -> None:
        if self.lease is not None:
            with self._lease_lock:
                self.store.release_lease(self.lease)
                self.lease = None

    def _set_capacity_zero(self) -> None:
        self.autoscaling.set_desired_capacity(AutoScalingGroupName=self.config.group_name,
                                              DesiredCapacity=0, HonorCooldown=False)
        log.info("desired capacity of %s set to 0", self.config.group_name)

    # Endings ---------------------------------------------------------------------------

    def _runtime_exceeded(self) -> bool:
        return time.time() - self.counters.started_at > self.config.max_runtime_seconds

    def _stop_for_max_runtime(self) -> None:
        log.warning("maximum run time of %.0f s reached; saving and stopping",
                    self.config.max_runtime_seconds)
        if self._save_and_stop_trainer(time.time() + 300) == contract.EXIT_COMPLETED:
            self._finish_completed()
        self._finish_stopped(f"maximum run time of {self.config.max_runtime_seconds:.0f} s "
                             f"reached (max_runtime_hours)")

    def _finish_completed(self) -> None:
        self._upload_new_checkpoints()
        self._wait_for_uploads(timeout=None)
        keys = self.store.upload_output(self.output_dir)
        self.state = "completed"
        self._write_status(force=True, ending="completed")
        self.store.append_event("completed", self.identity.instance_id,
                                step=self.progress.step, output_keys=keys)
        self.store.mark_done({"run_id": self.config.run_id, "completed_at": time.time(),
                              "instance_id": self.identity.instance_id,
                              "final_step": self.progress.step})
        self._release_lease()
        self._set_capacity_zero()
        latest = self.progress.latest or {}
        self.notifier.publish("completed", [
            f"Training completed at step {latest.get('step')} with final loss "
            f"{latest.get('loss')}.",
            f"Instances: {self.counters.instances_launched}, interruptions: "
            f"{self.counters.interruptions}, crashes: {self.counters.crashes}.",
            self._cost_line(),
            f"Model and metrics: s3://{self.config.bucket}/{self.config.run_prefix}output/"])
        raise RunEnded(EXIT_OK)

    def _cost_line(self) -> str:
        """Estimate the run's instance cost at this instance's current spot price."""
        try:
            hours = instance_hours(self.store.list_events(), time.time())
            price = latest_spot_price(self.ec2, self.identity.instance_type,
                                      self.identity.availability_zone)
        except (ClientError, BotoCoreError) as error:
            log.warning("could not estimate the run's cost: %s", error)
            return f"Cost: not estimated ({error})."
        if price is None:
            return f"Instance hours: {hours:.2f}; no spot price found for " \
                   f"{self.identity.instance_type} in {self.identity.availability_zone}."
        return (f"Estimated instance cost: ${hours * price:.2f} ({hours:.2f} instance-hours "
                f"at the latest spot price of {self.identity.instance_type} in "
                f"{self.identity.availability_zone}, ${price:.4f}/h; "
                f"`python -m spotrun_cli status {self.config.run_id}` for the breakdown).")

    def _finish_failed(self, ending: str, reason: str,
                       log_tail: list[str] | None = None) -> None:
        log.error("run failed: %s", reason)
        self.state = "failed"
        self._write_status(force=True, ending=ending, reason=reason, log_tail=log_tail or [])
        self.store.append_event("failed", self.identity.instance_id, ending=ending,
                                reason=reason)
        self.notifier.publish("failed", [f"The run failed: {reason}.",
                                         "Last lines of the trainer's log:",
                                         *(log_tail or [])[-20:]])
        self._release_lease()
        self._set_capacity_zero()
        raise RunEnded(EXIT_RUN_FAILED)

    def _finish_stopped(self, reason: str) -> None:
        self.state = "stopped"
        self._write_status(force=True, ending="max_runtime", reason=reason)
        self.store.append_event("stopped", self.identity.instance_id, ending="max_runtime",
                                reason=reason, committed_step=self.committed_step)
        self.notifier.publish("stopped", [f"The run stopped: {reason}.",
                                          f"Last committed checkpoint: step "
                                          f"{self.committed_step}."])
        self._release_lease()
        self._set_capacity_zero()
        raise RunEnded(EXIT_RUN_FAILED)


PERMANENT_ERROR_CODES = frozenset({"AccessDenied", "AccessDeniedException",
                                   "UnauthorizedOperation", "InvalidClientTokenId",
                                   "NoSuchBucket"})


def record_bootstrap_crash(supervisor: Supervisor, error: Exception) -> None:
    """Record an unexpected supervisor error in the run status, as far as AWS allows.

    A permission or configuration error would repeat on every replacement instance, so
    it fails the run and sets the capacity to 0; other errors count as a bootstrap crash
    and the instance shuts down so that the group replaces it.
    """
    code = getattr(error, "response", {}).get("Error", {}).get("Code", "")
    permanent = code in PERMANENT_ERROR_CODES
    supervisor.counters.bootstrap_crashes += 1
    reason = f"supervisor error: {error}"
    if permanent:
        supervisor.state = "failed"
    steps = []
    if supervisor.lease is not None:
        # Only the lease holder writes the status; others leave the last writer's.
        steps.append(("status", lambda: supervisor.store.write_status({
            "run_id": supervisor.config.run_id, "state": supervisor.state,
            "reason": reason, "error_code": code,
            "instance_id": supervisor.identity.instance_id,
            "committed_step": supervisor.committed_step, "updated_at": time.time(),
            **vars(supervisor.counters)})))
    steps.append(("event", lambda: supervisor.store.append_event(
        "bootstrap_crash", supervisor.identity.instance_id, reason=reason,
        error_code=code)))
    if permanent:
        steps.append(("capacity", supervisor._set_capacity_zero))
    for name, step in steps:
        try:
            step()
        except Exception as secondary:  # noqa: BLE001 - reporting must not mask the crash
            log.error("could not record the crash (%s): %s", name, secondary)
