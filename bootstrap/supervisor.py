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
from bootstrap.cluster import (
    MEMBER_FRESH_S,
    MEMBER_HEARTBEAT_S,
    Round,
    free_port,
    torchrun_command,
    uses_torchrun,
)
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
# Exit codes after which a multi-node round ends without counting a crash.
ROUND_END_CODES = (contract.EXIT_SAVED, contract.EXIT_PEER_LOST)


@dataclass
class Counters:
    """Run-wide counts kept in status.json across instances."""

    instances_launched: int = 0
    interruptions: int = 0
    crashes: int = 0
    bootstrap_crashes: int = 0
    started_at: float = field(default_factory=time.time)


class CheckpointFetchError(Exception):
    """The checkpoint step a round resumes from could not be downloaded whole."""


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
        self._trainer_hung = False
        self._first_step_seen = False
        # Multi-node state: the leader holds the lease and publishes rounds; members
        # register and join the rounds that list them.
        self.multi_node = config.nodes > 1
        self.is_leader = True
        self.round: Round | None = None
        self._round_end_requested = False
        # Set when this instance stops its own round's trainer because the round cannot
        # go on (a listed peer vanished, or the leader started a newer round).
        self._round_abandoned = False
        self._last_member_check = 0.0
        self._last_round_check = 0.0

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
            if self.multi_node:
                self._run_rounds()
            else:
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
        if self.multi_node:
            self.lease = self.store.try_acquire_lease(self.identity.instance_id,
                                                      self.config.lease_ttl_seconds)
            if self.lease is None:
                self._become_member()
                return
            log.info("holding run lease generation %d: leading the run's rounds",
                     self.lease.generation)
        else:
            self._acquire_lease()
        self._begin_leadership()

    def _begin_leadership(self) -> None:
        """Load the run's counts from status.json and record this instance as the writer."""
        self.is_leader = True
        self._write_role()
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
        if self.multi_node:
            # The leader reports the start and each resume when it publishes a round.
            pass
        elif manifest is not None:
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
                self._leave_rounds()
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
                    self._leave_rounds()
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
        if self.round is not None:
            # Every instance of a round resumes from the step the leader published.
            if self.round.resume_step is not None:
                resume = str(self.checkpoint_dir / contract.step_folder_name(
                    self.round.resume_step))
        else:
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
            contract.ENV_COLLECTIVE_TIMEOUT: str(self.config.collective_timeout_seconds),
        })
        return env

    def _training_command(self) -> list[str]:
        if not uses_torchrun(self.config):
            return self.config.train_command
        return torchrun_command(self.config, round_=self.round, is_host=self.is_leader,
                                local_addr=self.identity.private_ip)

    def _start_trainer(self) -> None:
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.trainer = TrainerProcess(self._training_command(), env=self._trainer_env(),
                                      cwd=self.code_dir,
                                      log_path=self.work_dir / "trainer.log",
                                      signal_children=uses_torchrun(self.config))
        self.state = "training"
        self._trainer_hung = False
        self._first_step_seen = False
        self._round_abandoned = False
        self._last_progress_at = time.monotonic()
        self._committed_at_trainer_start = self.committed_step

    def _train(self) -> None:
        self._start_trainer()
        while True:
            code = self._train_until_exit()
            self._on_trainer_exit(code, hung=self._trainer_hung)

    def _train_until_exit(self) -> int:
        """Supervise the running trainer until it exits; return its exit code."""
        while True:
            self._tick()
            code = self.trainer.poll()
            if code is not None:
                return code
            time.sleep(TICK_S)

    def _tick(self) -> None:
        if self._shutdown_requested.is_set():
            self._on_shutdown()
        if self.progress.read_new():
            self._last_progress_at = time.monotonic()
            self._first_step_seen = True
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
        if self.multi_node:
            self._check_round_membership()
        if self.is_leader and self._runtime_exceeded():
            self._stop_for_max_runtime()

    def _check_heartbeat(self) -> None:
        """Kill a trainer that reported no step for heartbeat_timeout_seconds."""
        silent_s = time.monotonic() - self._last_progress_at
        allowed_s = self.config.heartbeat_timeout_seconds
        if uses_torchrun(self.config) and not self._first_step_seen:
            # torchrun's rendezvous may wait up to its join timeout for the peers.
            allowed_s += self.config.rendezvous_timeout_seconds
        if silent_s <= allowed_s or self._trainer_hung or self.trainer.poll() is not None:
            return
        log.error("trainer reported no step for %.0f s (heartbeat_timeout_seconds is %.0f);"
                  " killing it as hung", silent_s, self.config.heartbeat_timeout_seconds)
        self._trainer_hung = True
        self.trainer.kill()

    def _on_trainer_exit(self, code: int, hung: bool = False) -> None:
        if self._shutdown_requested.is_set():
            # The trainer got the shutdown's SIGTERM too and may already have saved.
            self._on_shutdown()
        self.progress.read_new()
        if code == contract.EXIT_COMPLETED and not hung:
            if not self.is_leader:
                self._wait_for_leader_to_finish()
            self._finish_completed()
        if self.multi_node and not hung and (code in ROUND_END_CODES or self._round_abandoned):
            self._on_round_end(code if code in ROUND_END_CODES else contract.EXIT_PEER_LOST)
            return
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
        if self.multi_node and not self.is_leader:
            # The leader counts rounds without progress; a member fails the run only
            # when its own crash budget is spent.
            if self.counters.crashes > self.config.max_crash_restarts:
                self._finish_failed(
                    "crash_budget_spent",
                    f"trainer crashed {self.counters.crashes} times on member "
                    f"{self.identity.instance_id} (last: {cause}); the budget "
                    f"max_crash_restarts is {self.config.max_crash_restarts}",
                    log_tail=tail)
            return
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
        if self.multi_node:
            return
        log.info("restarting the trainer in place")
        self._start_trainer()

    # Multi-node rounds -----------------------------------------------------------------

    def _run_rounds(self) -> None:
        """Train in rendezvous rounds until the run ends (see bootstrap/cluster.py)."""
        while True:
            if self.is_leader:
                self._lead_round()
            else:
                self._follow_round()
            code = self._train_until_exit()
            self._on_trainer_exit(code, hung=self._trainer_hung)

    def _write_role(self) -> None:
        """Write this instance's role to the work folder, for people and tools on it."""
        role = "leader" if self.is_leader else "member"
        (self.work_dir / "role").write_text(role + "\n", encoding="utf-8")

    def _become_member(self) -> None:
        self.is_leader = False
        self._write_role()
        self.store.register_member(self.identity.instance_id, self.identity.private_ip)
        self._last_member_check = time.monotonic()
        self.store.append_event("instance_started", self.identity.instance_id,
                                instance_type=self.identity.instance_type,
                                availability_zone=self.identity.availability_zone,
                                role="member")
        log.info("the run lease is held by another instance: joining as a member")

    def _round_status(self) -> dict:
        if self.round is None:
            return {}
        return {"round": self.round.number, "nodes": self.round.node_count}

    def _lead_round(self) -> None:
        """Upload what is committed locally, wait for members, publish a round, start it."""
        self._upload_new_checkpoints()
        self._wait_for_uploads(timeout=None)
        resume_step = self.committed_step
        if resume_step is not None and not self._has_local_checkpoint(resume_step):
            try:
                self._fetch_checkpoint(resume_step)
            except CheckpointFetchError as error:
                self._finish_failed("checkpoint_missing", str(error))
        members = self._wait_for_members()
        previous = self.store.read_rendezvous()
        number = max(int(previous["round"]) if previous else 0,
                     self.round.number if self.round else 0) + 1
        port = free_port(self.identity.private_ip)
        self.round = Round(number=number, endpoint=f"{self.identity.private_ip}:{port}",
                           leader=self.identity.instance_id, members=tuple(members),
                           resume_step=resume_step)
        self.store.publish_rendezvous({**self.round.to_dict(), "published_at": time.time(),
                                       "lease_generation": self.lease.generation})
        self.store.append_event("round_started", self.identity.instance_id,
                                round=number, members=members, resume_step=resume_step)
        self._announce_round()
        log.info("round %d: %d instance(s), resuming from step %s, rendezvous at %s",
                 number, self.round.node_count, resume_step, self.round.endpoint)
        self._round_end_requested = False
        self._start_trainer()
        self._write_status(force=True)

    def _announce_round(self) -> None:
        where = f"{self.round.node_count} instances led by {self.identity.instance_id}"
        if self.round.resume_step is None:
            if self.round.number == 1:
                self.notifier.publish("started", [f"Training started on {where}."])
            return
        self.resumed_from = self.round.resume_step
        self.store.append_event("resumed", self.identity.instance_id,
                                step=self.round.resume_step, round=self.round.number)
        self.notifier.publish(f"resumed from step {self.round.resume_step}",
                              [f"Resumed from checkpoint step {self.round.resume_step} on "
                               f"{where} (round {self.round.number}).",
                               f"Interruptions so far: {self.counters.interruptions}."])

    def _wait_for_members(self) -> list[str]:
        """Return the members of the next round: nodes - 1 of them, or after
        rendezvous_timeout_seconds at least min_nodes - 1; fail the run otherwise."""
        needed = self.config.nodes - 1
        self.state = "waiting_for_instances"
        started = time.monotonic()
        announced = -1
        while True:
            fresh = [member for member in self.store.fresh_members(MEMBER_FRESH_S)
                     if member != self.identity.instance_id]
            if len(fresh) >= needed:
                return fresh[:needed]
            waited = time.monotonic() - started
            if waited > self.config.rendezvous_timeout_seconds:
                if len(fresh) + 1 >= self.config.min_nodes:
                    log.warning("starting the round with %d of %d instances after %.0f s",
                                len(fresh) + 1, self.config.nodes, waited)
                    return fresh
                self._finish_failed(
                    "rendezvous_timeout",
                    f"only {len(fresh) + 1} of the {self.config.min_nodes} instances needed "
                    f"(min_nodes) were ready after {waited:.0f} s "
                    f"(rendezvous_timeout_seconds is {self.config.rendezvous_timeout_seconds:.0f})")
            if len(fresh) != announced:
                log.info("waiting for instances: %d of %d ready", len(fresh) + 1,
                         self.config.nodes)
                announced = len(fresh)
            self._write_status()
            self._check_notices_during_start("waiting for the run's other instances")
            if self._runtime_exceeded():
                self._finish_stopped("maximum run time reached while waiting for instances")
            time.sleep(1.0)

    def _follow_round(self) -> None:
        """Wait for a round that lists this member, or take the lease if the leader is gone."""
        last = self.round.number if self.round else 0
        self.state = "waiting_for_round"
        self._renew_membership(force=True)
        while True:
            self._renew_membership()
            if self.store.is_done():
                self._end_member_quietly(EXIT_OK)
            document = self.store.read_rendezvous()
            if document is not None:
                published = Round.from_dict(document)
                if published.number > last and self.identity.instance_id in published.members:
                    break
            if self._take_over_lease("the run lease is free: this instance leads the run "
                                     "from now on"):
                self._lead_round()
                return
            self._check_notices_during_start("waiting for a round")
            time.sleep(1.0)
        self.round = published
        if published.resume_step is not None and not self._has_local_checkpoint(
                published.resume_step):
            try:
                self._fetch_checkpoint(published.resume_step)
            except CheckpointFetchError as error:
                # Leaving makes the leader drop this instance and start a new round.
                log.error("%s; this instance leaves the run", error)
                self._leave_rounds()
                raise RunEnded(EXIT_RUN_FAILED) from error
        log.info("joining round %d of leader %s at %s (%d instances, step %s)",
                 published.number, published.leader, published.endpoint,
                 published.node_count, published.resume_step)
        self._start_trainer()

    def _has_local_checkpoint(self, step: int) -> bool:
        folder = self.checkpoint_dir / contract.step_folder_name(step)
        return contract.read_verified_manifest(folder) is not None

    def _fetch_checkpoint(self, step: int) -> None:
        if self.store.download_checkpoint(step, self.checkpoint_dir) is None:
            raise CheckpointFetchError(
                f"committed checkpoint step {step} in S3 is missing or does not verify")

    def _renew_membership(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_member_check < MEMBER_HEARTBEAT_S:
            return
        self._last_member_check = now
        self.store.register_member(self.identity.instance_id, self.identity.private_ip)

    def _check_round_membership(self) -> None:
        if self.is_leader:
            self._check_round_as_leader()
        else:
            self._check_round_as_member()

    def _check_round_as_member(self) -> None:
        """Stay registered, and stop a trainer whose round the leader has replaced."""
        self._renew_membership()
        now = time.monotonic()
        if now - self._last_round_check < MEMBER_HEARTBEAT_S:
            return
        self._last_round_check = now

        document = self.store.read_rendezvous()
        if (document is not None and self.round is not None
                and int(document["round"]) > self.round.number
                and self.trainer.poll() is None):
            log.warning("round %d has started without this instance; stopping round %d",
                        int(document["round"]), self.round.number)
            self._round_abandoned = True
            self.trainer.kill()

    def _check_round_as_leader(self) -> None:
        """Abandon a round whose member vanished before it formed, or end a short round
        with a save to let waiting instances in."""
        now = time.monotonic()
        if self._round_end_requested or now - self._last_member_check < MEMBER_HEARTBEAT_S:
            return
        self._last_member_check = now
        if self.round is None:
            return

        fresh = set(self.store.fresh_members(MEMBER_FRESH_S))
        vanished = [member for member in self.round.members if member not in fresh]
        if vanished and not self._first_step_seen and self.trainer.poll() is None:
            # torchrun would wait its whole join timeout for an instance that is gone.
            log.warning("member(s) %s stopped renewing before round %d formed; starting a "
                        "new round", ", ".join(vanished), self.round.number)
            self._round_abandoned = True
            self.trainer.kill()
            return

        if self.round.node_count >= self.config.nodes:
            return
        waiting = [member for member in fresh
                   if member not in self.round.members and member != self.identity.instance_id]
        if waiting and self._first_step_seen:
            log.info("instance(s) %s ready to join: saving and starting a new round",
                     ", ".join(waiting))
            self._round_end_requested = True
            self.trainer.send(contract.SIGNAL_SAVE_AND_EXIT)

    def _on_round_end(self, code: int) -> None:
        """Handle a round that ended with a save or a lost peer (no crash)."""
        reason = "saved" if code == contract.EXIT_SAVED else "peer lost"
        log.warning("round %s ended (%s, exit code %d)",
                    self.round.number if self.round else "?", reason, code)
        if not self.is_leader:
            return

        failure = self.store.read_failure()
        if failure is not None:
            self._finish_failed(failure.get("ending", "failed"), failure.get("reason", ""),
                                log_tail=failure.get("log_tail"))
        self._upload_new_checkpoints()
        self._wait_for_uploads(timeout=None)

        if code == contract.EXIT_SAVED and not self._round_end_requested:
            # A member got a spot notice or a shutdown and all ranks saved.
            self.counters.interruptions += 1
        if self.committed_step == self._committed_at_trainer_start and not (
                self._round_end_requested and code == contract.EXIT_SAVED):
            self.restarts_without_progress += 1
        else:
            self.restarts_without_progress = 0

        self.store.append_event("round_ended", self.identity.instance_id,
                                round=self.round.number if self.round else None,
                                exit_code=code, committed_step=self.committed_step,
                                restarts_without_progress=self.restarts_without_progress)
        if self.restarts_without_progress >= self.config.max_restarts_without_progress:
            self._finish_failed(
                "no_progress",
                f"{self.restarts_without_progress} rounds in a row ended without a newer "
                f"committed checkpoint (committed step stayed at {self.committed_step}; last: "
                f"{reason}); max_restarts_without_progress is "
                f"{self.config.max_restarts_without_progress}")

    def _wait_for_leader_to_finish(self) -> None:
        """Member whose training completed: wait for DONE, or finish the run itself if
        the leader's lease goes stale first (every instance holds the final outputs)."""
        self.state = "completed"
        while True:
            if self.store.is_done():
                self._end_member_quietly(EXIT_OK)
            if self._take_over_lease("the leader did not finish the run; finishing it "
                                     "from this instance"):
                return
            if self._shutdown_requested.is_set() and self.store.is_done():
                self._end_member_quietly(EXIT_OK)
            time.sleep(1.0)

    def _take_over_lease(self, message: str) -> bool:
        """Member: take the run lease if it is free or stale, and become the leader."""
        lease = self.store.try_acquire_lease(self.identity.instance_id,
                                             self.config.lease_ttl_seconds)
        if lease is None:
            return False
        log.warning("%s", message)
        self.lease = lease
        self.store.remove_member(self.identity.instance_id)
        self._begin_leadership()
        return True

    def _leave_rounds(self) -> None:
        if not self.is_leader:
            self.store.remove_member(self.identity.instance_id)

    def _end_member_quietly(self, exit_code: int) -> None:
        if not self.is_leader:
            self.store.remove_member(self.identity.instance_id)
        raise RunEnded(exit_code)

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
        # A leaving member must not be listed in the leader's next round.
        self._leave_rounds()
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
        if self.multi_node and self.store.is_done():
            log.info("the instance is shutting down after the run completed")
            self._end_member_quietly(EXIT_OK)
        self._leave_rounds()
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
        signalled = self.trainer.send(contract.SIGNAL_SAVE_AND_EXIT)
        while self.trainer.poll() is None and time.time() < deadline:
            self.progress.read_new()
            time.sleep(TICK_S / 2)
            if not signalled:
                # torchrun had not started the training processes yet: try again.
                signalled = self.trainer.send(contract.SIGNAL_SAVE_AND_EXIT)
        self.progress.read_new()
        if self.trainer.poll() is None:
            log.error("trainer did not save before the notice deadline; killing it")
            self.trainer.kill()
            return None
        self._upload_new_checkpoints()
        self._wait_for_uploads(timeout=max(0.0, deadline - time.time()))
        if not self.is_leader:
            self._wait_for_leader_commit(deadline)
        return self.trainer.poll()

    def _wait_for_leader_commit(self, deadline: float) -> None:
        """Member after a save: wait until the leader committed that step to S3, so the
        interruption records the step the run resumes from."""
        newest = self._newest_local_checkpoint()
        if newest is None:
            return
        while time.time() < deadline:
            latest = self.store.latest_step()
            if latest is not None and latest >= newest[0]:
                self.committed_step = latest
                return
            time.sleep(TICK_S)
        log.warning("the leader had not committed step %d to S3 by the notice deadline",
                    newest[0])

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
        if self.multi_node:
            self._leave_rounds()
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
        if not self.is_leader:
            # Members keep their copies only for a takeover; the leader uploads its own.
            self._prune_local_copies()
            return
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

    def _prune_local_copies(self) -> None:
        committed = contract.committed_local_checkpoints(self.checkpoint_dir)
        keep = self.config.keep_checkpoints
        if len(committed) > keep:
            self._prune_local(keep_step=committed[-keep][0])

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
        if not self.is_leader:
            return
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
            **self._round_status(),
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
        if not self.is_leader:
            # Only the leader writes the status and ends the group; it reads this record
            # when the round ends.
            self.store.record_failure({"ending": ending, "reason": reason,
                                       "instance_id": self.identity.instance_id,
                                       "log_tail": log_tail or []})
            self.store.append_event("failed", self.identity.instance_id, ending=ending,
                                    reason=reason)
            self._end_member_quietly(EXIT_RUN_FAILED)
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
