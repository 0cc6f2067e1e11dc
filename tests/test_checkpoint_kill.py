"""SIGKILL during checkpoint saves and uploads never leaves a torn checkpoint to resume.

How the kill points are chosen: a child process (tests/checkpoint_kill_child.py) saves
or uploads a few checkpoints of a model with Adam state (about 17 MB per checkpoint)
and counts named events on the way: each tensor copied into the snapshot, each MiB
written to a file, every fsync, the manifest rename, every S3 request before it is
built and after its response, and each MiB of a request body read for sending. A
first child runs without a kill and records the list of events. The test then spreads
kill points over every kind of event and starts one child per point, which sends
itself SIGKILL just before that event. The points are deterministic, so a failure
names the exact event to reproduce it with.

After every kill, the test resumes as the next instance would: locally with
``find_latest_checkpoint`` and ``load``, and from S3 with
``RunStore.download_newest_checkpoint``. What it finds must verify, must hold exactly
the model and optimizer state of its step, and must not be older than the last
checkpoint committed before the kill. ``latest.json`` must never name a folder whose
manifest is missing.

Children start from a forkserver that has already imported torch, so each kill costs
a fork instead of an interpreter start. A save child also starts its checkpoint writer
process, which imports torch. Uploads go to the moto server over HTTP with
5 MiB parts, so every file of more than 5 MiB takes the multipart path.

The multipart failure tests inject an error response in botocore's ``before-send``
hook, below the HTTP client, because the emulator never fails a part upload.
"""

from __future__ import annotations

import multiprocessing
import uuid
from collections import defaultdict
from pathlib import Path

import pytest
from boto3.exceptions import S3UploadFailedError
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError

from bootstrap.store import RunStore
from ml import contract
from ml.checkpoint import find_latest_checkpoint, load, state_dict_sha256
from ml.contract import MANIFEST_NAME
from tests import checkpoint_kill_child as child

STEPS = (1, 2)
SAVE_KILL_POINTS = 27
UPLOAD_KILL_POINTS = 27
# Every n-th save kill is followed by a child that saves the same steps again.
SAVE_AGAIN_EVERY = 2
CHILD_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def fork_context():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(child.FORKSERVER_PRELOAD)
    return context


@pytest.fixture(scope="module")
def expected_hashes() -> dict[int, tuple[str, str]]:
    """Model and optimizer hashes after each step of STEPS, computed in this process."""
    return {step: child.expected_state_sha256(step) for step in STEPS}


@pytest.fixture(scope="module")
def committed_local_dir(fork_context, tmp_path_factory) -> Path:
    """A checkpoint directory with committed checkpoints of every step in STEPS."""
    root = tmp_path_factory.mktemp("committed")
    config = child.ChildConfig(mode="save", checkpoint_dir=str(root / "checkpoints"), steps=STEPS,
                               events_path=str(root / "events.txt"))
    exit_code = run_child(fork_context, config)
    assert exit_code == 0, f"the child that writes the checkpoints to upload exited with {exit_code}"
    return root / "checkpoints"


def run_child(context, config: child.ChildConfig) -> int:
    process = context.Process(target=child.run, args=(config,))
    process.start()
    process.join(CHILD_TIMEOUT_S)
    if process.is_alive():
        process.kill()
        process.join()
        pytest.fail(f"the child did not finish within {CHILD_TIMEOUT_S:.0f} s: {config}")
    return process.exitcode


def read_events(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def phase_of(event: str) -> str:
    """Return an event name without its trailing counter: "write model.pt 3" -> "write model.pt"."""
    words = event.split()
    while words and words[-1].isdigit():
        words.pop()
    return " ".join(words)


def choose_kill_points(events: list[str], total: int) -> list[int]:
    """Return event indices spread over every phase, about ``total`` of them.

    Each phase gets a share of the points in proportion to its number of events, and
    at least one; within a phase the points are evenly spaced.
    """
    by_phase: dict[str, list[int]] = defaultdict(list)
    for index, event in enumerate(events):
        by_phase[phase_of(event)].append(index)
    chosen = set()
    for indices in by_phase.values():
        share = max(1, round(total * len(indices) / len(events)))
        share = min(share, len(indices))
        for position in range(share):
            chosen.add(indices[position * len(indices) // share])
    return sorted(chosen)


def count_before_kill(events: list[str], name: str) -> int:
    """Return how many times ``name`` happened before the kill."""
    count = 0
    for event in events:
        if event.startswith("KILL "):
            break
        if event == name:
            count += 1
    return count


def killed_event(events: list[str]) -> str:
    kills = [event for event in events if event.startswith("KILL ")]
    return kills[-1][len("KILL "):] if kills else "(no kill)"


def loaded_hashes(folder: Path, run_id: str) -> tuple[int, tuple[str, str]]:
    """Load a checkpoint into a model built from another seed; return (step, hashes)."""
    model, optimizer = child.build_training(seed=child.SEED + 1)
    state = load(folder, model, optimizer, run_id=run_id)
    return state.step, (state_dict_sha256(model), child.optimizer_sha256(optimizer))


# ---------------------------------------------------------------------------
# Local saves


def check_local_resume(checkpoint_dir: Path, run_id: str, committed_before_kill: int,
                       expected: dict[int, tuple[str, str]], where: str) -> None:
    for step, folder in contract.committed_local_checkpoints(checkpoint_dir):
        assert contract.read_verified_manifest(folder) is not None, (
            f"{where}: {folder.name} has a manifest but its files do not verify")

    latest = find_latest_checkpoint(checkpoint_dir)
    if committed_before_kill == 0:
        assert latest is None or contract.parse_step_folder(latest.name) == STEPS[0], (
            f"{where}: found {latest} although no save had committed")
    else:
        assert latest is not None, f"{where}: no checkpoint found after {committed_before_kill} commits"
        found_step = contract.parse_step_folder(latest.name)
        assert found_step >= STEPS[committed_before_kill - 1], (
            f"{where}: found step {found_step}, older than the last committed step "
            f"{STEPS[committed_before_kill - 1]}")
    if latest is not None:
        step, hashes = loaded_hashes(latest, run_id)
        assert hashes == expected[step], f"{where}: the state loaded from step {step} differs from training"


def test_save_kill_points_cover_phases(fork_context, tmp_path):
    config = child.ChildConfig(mode="save", checkpoint_dir=str(tmp_path / "checkpoints"), steps=STEPS,
                               events_path=str(tmp_path / "events.txt"))

    assert run_child(fork_context, config) == 0
    events = read_events(tmp_path / "events.txt")
    phases = {phase_of(event) for event in events}

    for phase in ("snapshot", "open model.pt", "write model.pt", "write optimizer.pt",
                  "write trainer.pt", "open manifest.json.tmp", "fsync before", "fsync after",
                  "rename before", "rename after"):
        assert phase in phases, f"the save never reached phase {phase!r}"
    assert count_before_kill(events, "rename after") == len(STEPS)
    assert len(choose_kill_points(events, SAVE_KILL_POINTS)) >= 25


def test_save_sigkill_leaves_no_torn_checkpoint(fork_context, expected_hashes, tmp_path):
    trace = child.ChildConfig(mode="save", checkpoint_dir=str(tmp_path / "trace"), steps=STEPS,
                              events_path=str(tmp_path / "trace.txt"))
    assert run_child(fork_context, trace) == 0
    kill_points = choose_kill_points(read_events(tmp_path / "trace.txt"), SAVE_KILL_POINTS)

    for kill_at in kill_points:
        root = tmp_path / f"kill-{kill_at}"
        config = child.ChildConfig(mode="save", checkpoint_dir=str(root / "checkpoints"), steps=STEPS,
                                   events_path=str(root / "events.txt"), kill_at=kill_at)
        root.mkdir()

        exit_code = run_child(fork_context, config)

        events = read_events(root / "events.txt")
        where = f"save killed at event {kill_at} ({killed_event(events)})"
        assert exit_code == -9, f"{where}: the child exited with {exit_code} instead of SIGKILL"
        committed = count_before_kill(events, "rename after")
        check_local_resume(root / "checkpoints", config.run_id, committed, expected_hashes, where)

        if kill_points.index(kill_at) % SAVE_AGAIN_EVERY:
            continue
        # The next instance saves the same steps into the same folders, over torn files.
        again = child.ChildConfig(mode="save", checkpoint_dir=config.checkpoint_dir, steps=STEPS,
                                  events_path=str(root / "again.txt"))
        assert run_child(fork_context, again) == 0, f"{where}: saving again failed"
        check_local_resume(root / "checkpoints", config.run_id, len(STEPS), expected_hashes,
                           f"{where}, then saved again")


# ---------------------------------------------------------------------------
# Uploads


def check_s3_resume(s3, bucket: str, run_id: str, committed_before_kill: int,
                    expected: dict[int, tuple[str, str]], download_dir: Path, where: str) -> None:
    store = RunStore(s3, bucket, run_id)
    prefix = f"runs/{run_id}/checkpoints/"

    latest = store._get_json("checkpoints/latest.json")[0]
    if latest is not None:
        try:
            s3.head_object(Bucket=bucket, Key=f"{prefix}{latest['folder']}/{MANIFEST_NAME}")
        except ClientError as error:
            pytest.fail(f"{where}: latest.json names {latest['folder']}, whose manifest is "
                        f"missing ({error})")

    for step in store.committed_steps():
        folder = contract.step_folder_name(step)
        body = s3.get_object(Bucket=bucket, Key=f"{prefix}{folder}/{MANIFEST_NAME}")["Body"].read()
        manifest = contract.Manifest.from_json(body.decode())
        for item in manifest.files:
            size = s3.head_object(Bucket=bucket, Key=f"{prefix}{folder}/{item.name}")["ContentLength"]
            assert size == item.size, (
                f"{where}: {folder}/{item.name} is {size} bytes in S3 but {item.size} in its manifest")

    manifest = store.download_newest_checkpoint(download_dir)
    if committed_before_kill > 0:
        assert manifest is not None, f"{where}: no checkpoint found after {committed_before_kill} commits"
        assert manifest.step >= STEPS[committed_before_kill - 1], (
            f"{where}: found step {manifest.step}, older than the last committed step "
            f"{STEPS[committed_before_kill - 1]}")
    if manifest is not None:
        # The uploaded folders were saved locally by run RUN_ID, whatever the S3 prefix.
        step, hashes = loaded_hashes(download_dir / contract.step_folder_name(manifest.step), child.RUN_ID)
        assert hashes == expected[step], f"{where}: the state downloaded for step {step} differs from training"


def test_upload_kill_points_cover_phases(fork_context, committed_local_dir, s3_bucket, tmp_path):
    s3, bucket = s3_bucket
    config = child.ChildConfig(mode="upload", checkpoint_dir=str(committed_local_dir), steps=STEPS,
                               events_path=str(tmp_path / "events.txt"),
                               endpoint=s3.meta.endpoint_url, bucket=bucket)

    assert run_child(fork_context, config) == 0
    events = read_events(tmp_path / "events.txt")
    phases = {phase_of(event) for event in events}

    for phase in ("call CreateMultipartUpload optimizer.pt", "body optimizer.pt",
                  "call UploadPart optimizer.pt", "done UploadPart optimizer.pt",
                  "done CompleteMultipartUpload optimizer.pt", "call PutObject trainer.pt",
                  "call PutObject manifest.json", "done PutObject manifest.json",
                  "call PutObject lease.json", "call PutObject latest.json",
                  "done PutObject latest.json", "call DeleteObject manifest.json"):
        assert phase in phases, f"the upload never reached phase {phase!r}"
    assert count_before_kill(events, "done PutObject latest.json") == len(STEPS)
    assert len(choose_kill_points(events, UPLOAD_KILL_POINTS)) >= 25


def test_upload_sigkill_leaves_no_torn_checkpoint(fork_context, committed_local_dir, s3_bucket,
                                                  expected_hashes, tmp_path):
    s3, bucket = s3_bucket
    endpoint = s3.meta.endpoint_url
    trace = child.ChildConfig(mode="upload", checkpoint_dir=str(committed_local_dir), steps=STEPS,
                              events_path=str(tmp_path / "trace.txt"), endpoint=endpoint,
                              bucket=bucket, run_id="trace")
    assert run_child(fork_context, trace) == 0
    kill_points = choose_kill_points(read_events(tmp_path / "trace.txt"), UPLOAD_KILL_POINTS)

    for kill_at in kill_points:
        root = tmp_path / f"kill-{kill_at}"
        root.mkdir()
        config = child.ChildConfig(mode="upload", checkpoint_dir=str(committed_local_dir), steps=STEPS,
                                   events_path=str(root / "events.txt"), kill_at=kill_at,
                                   endpoint=endpoint, bucket=bucket, run_id=f"kill-{kill_at}")

        exit_code = run_child(fork_context, config)

        events = read_events(root / "events.txt")
        where = f"upload killed at event {kill_at} ({killed_event(events)})"
        assert exit_code == -9, f"{where}: the child exited with {exit_code} instead of SIGKILL"
        committed = count_before_kill(events, "done PutObject latest.json")
        check_s3_resume(s3, bucket, config.run_id, committed, expected_hashes, root / "download", where)


# ---------------------------------------------------------------------------
# Failed multipart uploads


def error_response(code: str, status: int) -> AWSResponse:
    body = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
            f"<Message>injected by the test</Message></Error>").encode()

    class Raw:
        def stream(self, *args, **kwargs):
            yield body

    return AWSResponse("http://injected", status, {"Content-Type": "application/xml"}, Raw())


@pytest.mark.parametrize("failing_operation", ["UploadPart", "CompleteMultipartUpload"])
def test_failed_multipart_upload_is_aborted(committed_local_dir, s3_bucket, failing_operation):
    s3, bucket = s3_bucket
    run_id = f"fail-{uuid.uuid4().hex[:8]}"
    store = RunStore(s3, bucket, run_id, transfer_config=child.small_part_transfer_config())
    lease = store.try_acquire_lease(child.INSTANCE_ID, child.LEASE_STALE_AFTER_S)
    folder = committed_local_dir / contract.step_folder_name(STEPS[0])
    manifest = contract.read_verified_manifest(folder)
    calls = []

    def inject(request, **_kwargs):
        calls.append(request.url)
        # Let the first part through, so the upload fails with a part already stored.
        if len(calls) >= 2 or failing_operation == "CompleteMultipartUpload":
            return error_response("AccessDenied", 403)
        return None

    handler_id = f"before-send.s3.{failing_operation}"
    s3.meta.events.register(handler_id, inject)
    try:
        # boto3 reports a failed part as S3UploadFailedError.
        with pytest.raises((ClientError, S3UploadFailedError)):
            store.upload_checkpoint(folder, manifest, lease)
    finally:
        s3.meta.events.unregister(handler_id, inject)

    assert calls, f"no {failing_operation} request was sent"
    uploads = s3.list_multipart_uploads(Bucket=bucket, Prefix=f"runs/{run_id}/").get("Uploads", [])
    assert uploads == [], f"incomplete multipart uploads left behind: {uploads}"
    keys = [item["Key"] for item in
            s3.list_objects_v2(Bucket=bucket, Prefix=f"runs/{run_id}/checkpoints/").get("Contents", [])]
    assert not any(key.endswith(MANIFEST_NAME) for key in keys), f"a manifest was uploaded: {keys}"
    assert store.latest_step() is None
