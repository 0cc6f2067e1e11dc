"""RunStore against the moto server over HTTP: lease, checkpoints, status and data."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import zipfile
from pathlib import Path

import pytest

from bootstrap.store import LeaseLostError, RunStore, fetch_data
from ml import contract
from ml.contract import Manifest, ManifestFile

RUN_ID = "run-store"
# Long enough that no lease in these tests goes stale unless a test waits for it.
FRESH_TTL_S = 60.0
SHORT_TTL_S = 0.5


def make_store(s3_bucket) -> RunStore:
    s3, bucket = s3_bucket
    return RunStore(s3, bucket, RUN_ID)


def write_checkpoint(checkpoint_dir: Path, step: int, epoch: int = 0) -> tuple[Path, Manifest]:
    """Write a committed local checkpoint folder: two files, then the manifest."""
    folder = checkpoint_dir / contract.step_folder_name(step)
    folder.mkdir(parents=True)
    contents = {
        "model.bin": bytes((step + index) % 256 for index in range(4096)),
        "state.json": json.dumps({"step": step, "epoch": epoch}).encode(),
    }
    files = []
    for name, data in contents.items():
        (folder / name).write_bytes(data)
        files.append(ManifestFile(name, len(data), contract.sha256_file(folder / name)))
    manifest = Manifest(run_id=RUN_ID, step=step, epoch=epoch, files=tuple(files),
                        signature="test-signature", created_at=time.time())
    contract.write_manifest(folder, manifest)
    return folder, manifest


def checkpoint_key(store: RunStore, step: int, name: str = "") -> str:
    return f"{store.prefix}checkpoints/{contract.step_folder_name(step)}/{name}"


def list_keys(s3_bucket, prefix: str) -> list[str]:
    s3, bucket = s3_bucket
    response = s3.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for item in response.get("Contents", []))


def read_latest(s3_bucket, store: RunStore) -> dict:
    s3, bucket = s3_bucket
    body = s3.get_object(Bucket=bucket, Key=store.prefix + "checkpoints/latest.json")["Body"]
    return json.loads(body.read())


# Lease ---------------------------------------------------------------------------------


def test_lease_first_acquire_is_generation_one(s3_bucket):
    store = make_store(s3_bucket)

    lease = store.try_acquire_lease("i-first", FRESH_TTL_S)

    assert lease is not None
    assert lease.instance_id == "i-first"
    assert lease.generation == 1


def test_lease_fresh_is_not_taken(s3_bucket):
    store = make_store(s3_bucket)
    first = store.try_acquire_lease("i-first", FRESH_TTL_S)

    second = store.try_acquire_lease("i-second", FRESH_TTL_S)

    assert first is not None
    assert second is None
    # The holder keeps renewing without interference.
    renewed = store.renew_lease(first)
    assert renewed.generation == 1
    assert renewed.etag != first.etag


def test_lease_stale_is_taken_over(s3_bucket, caplog):
    store = make_store(s3_bucket)
    first = store.try_acquire_lease("i-first", SHORT_TTL_S)
    assert first is not None
    time.sleep(SHORT_TTL_S + 0.3)

    with caplog.at_level(logging.WARNING, logger="spotrun.store"):
        second = store.try_acquire_lease("i-second", SHORT_TTL_S)

    assert second is not None
    assert second.instance_id == "i-second"
    assert second.generation == 2
    assert "taking over the lease of i-first" in caplog.text
    with pytest.raises(LeaseLostError):
        store.renew_lease(first)
    # The new holder is unaffected by the failed renewal.
    assert store.renew_lease(second).generation == 2


def race_for_lease(store: RunStore, instance_ids: list[str], stale_after_s: float) -> dict:
    """Call try_acquire_lease from one thread per instance, released together."""
    barrier = threading.Barrier(len(instance_ids))
    results: dict[str, object] = {}
    errors: list[BaseException] = []

    def race(instance_id: str) -> None:
        try:
            barrier.wait(timeout=10)
            results[instance_id] = store.try_acquire_lease(instance_id, stale_after_s)
        except BaseException as error:  # noqa: BLE001 - checked by the test thread
            errors.append(error)

    threads = [threading.Thread(target=race, args=(name,)) for name in instance_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert sorted(results) == sorted(instance_ids)
    return results


@pytest.mark.parametrize("attempt", range(4))
def test_lease_race_for_free_lease(s3_bucket, attempt):
    store = make_store(s3_bucket)
    instance_ids = ["i-racer-a", "i-racer-b"]

    results = race_for_lease(store, instance_ids, FRESH_TTL_S)

    winners = [lease for lease in results.values() if lease is not None]
    assert len(winners) == 1
    assert winners[0].generation == 1
    # The stored lease names the winner, so the winner can renew and the loser cannot take it.
    assert store.renew_lease(winners[0]).instance_id == winners[0].instance_id
    loser = next(name for name in instance_ids if name != winners[0].instance_id)
    assert store.try_acquire_lease(loser, FRESH_TTL_S) is None


@pytest.mark.parametrize("attempt", range(3))
def test_lease_race_for_stale_lease(s3_bucket, attempt):
    store = make_store(s3_bucket)
    assert store.try_acquire_lease("i-dead", SHORT_TTL_S) is not None
    time.sleep(SHORT_TTL_S + 0.3)

    results = race_for_lease(store, ["i-racer-a", "i-racer-b"], SHORT_TTL_S)

    winners = [lease for lease in results.values() if lease is not None]
    assert len(winners) == 1
    assert winners[0].generation == 2
    assert store.renew_lease(winners[0]).instance_id == winners[0].instance_id


def test_lease_release_then_acquire(s3_bucket):
    store = make_store(s3_bucket)
    first = store.try_acquire_lease("i-first", FRESH_TTL_S)
    assert first is not None

    store.release_lease(first)
    second = store.try_acquire_lease("i-second", FRESH_TTL_S)

    assert second is not None
    assert second.instance_id == "i-second"
    assert second.generation == 1


def test_lease_release_after_takeover_keeps_new_lease(s3_bucket):
    store = make_store(s3_bucket)
    first = store.try_acquire_lease("i-first", SHORT_TTL_S)
    time.sleep(SHORT_TTL_S + 0.3)
    second = store.try_acquire_lease("i-second", SHORT_TTL_S)
    assert second is not None

    store.release_lease(first)

    assert store.renew_lease(second).instance_id == "i-second"


# Checkpoints ---------------------------------------------------------------------------


def test_checkpoint_upload_moves_latest(s3_bucket, tmp_path):
    store = make_store(s3_bucket)
    lease = store.try_acquire_lease("i-first", FRESH_TTL_S)
    folder, manifest = write_checkpoint(tmp_path / "local", step=10, epoch=1)

    renewed = store.upload_checkpoint(folder, manifest, lease)

    latest = read_latest(s3_bucket, store)
    assert latest["step"] == 10
    assert latest["epoch"] == 1
    assert latest["folder"] == "step-00000010"
    assert latest["lease_generation"] == 1
    assert renewed.etag != lease.etag
    assert list_keys(s3_bucket, checkpoint_key(store, 10)) == [
        checkpoint_key(store, 10, name) for name in ("manifest.json", "model.bin", "state.json")]
    assert store.committed_steps() == [10]


def test_checkpoint_download_verifies(s3_bucket, tmp_path):
    store = make_store(s3_bucket)
    lease = store.try_acquire_lease("i-first", FRESH_TTL_S)
    folder, manifest = write_checkpoint(tmp_path / "local", step=10, epoch=1)
    store.upload_checkpoint(folder, manifest, lease)
    target = tmp_path / "restore"
    target.mkdir()

    downloaded = store.download_newest_checkpoint(target)

    assert downloaded == manifest
    assert contract.read_verified_manifest(target / "step-00000010") == manifest
    assert (target / "step-00000010" / "model.bin").read_bytes() == (
        folder / "model.bin").read_bytes()


def test_checkpoint_download_empty_run(s3_bucket, tmp_path):
    store = make_store(s3_bucket)

    assert store.download_newest_checkpoint(tmp_path) is None


@pytest.mark.parametrize("damage", ["missing", "truncated", "byte flipped"])
def test_checkpoint_download_skips_torn(s3_bucket, tmp_path, caplog, damage):
    s3, bucket = s3_bucket
    store = make_store(s3_bucket)
    lease = store.try_acquire_lease("i-first", FRESH_TTL_S)
    for step in (10, 20):
        folder, manifest = write_checkpoint(tmp_path / "local", step=step)
        lease = store.upload_checkpoint(folder, manifest, lease)
    damaged_key = checkpoint_key(store, 20, "model.bin")
    if damage == "missing":
        s3.delete_object(Bucket=bucket, Key=damaged_key)
    elif damage == "truncated":
        s3.put_object(Bucket=bucket, Key=damaged_key, Body=b"only the first bytes")
    else:
        # Same size, so only the SHA-256 check can tell.
        data = bytearray(s3.get_object(Bucket=bucket, Key=damaged_key)["Body"].read())
        data[len(data) // 2] ^= 0xFF
        s3.put_object(Bucket=bucket, Key=damaged_key, Body=bytes(data))
    target = tmp_path / "restore"
    target.mkdir()

    with caplog.at_level(logging.WARNING, logger="spotrun.store"):
        downloaded = store.download_newest_checkpoint(target)

    assert downloaded is not None
    assert downloaded.step == 10
    assert contract.read_verified_manifest(target / "step-00000010") is not None
    assert "checkpoint step 20 in S3 is incomplete or corrupt" in caplog.text


def test_checkpoint_without_manifest_is_ignored(s3_bucket, tmp_path):
    s3, bucket = s3_bucket
    store = make_store(s3_bucket)
    lease = store.try_acquire_lease("i-first", FRESH_TTL_S)
    folder, manifest = write_checkpoint(tmp_path / "local", step=10)
    store.upload_checkpoint(folder, manifest, lease)
    # Files of a newer checkpoint whose upload stopped before its manifest.
    for name in ("model.bin", "state.json"):
        s3.put_object(Bucket=bucket, Key=checkpoint_key(store, 30, name), Body=b"partial")
    target = tmp_path / "restore"
    target.mkdir()

    downloaded = store.download_newest_checkpoint(target)

    assert store.committed_steps() == [10]
    assert downloaded is not None
    assert downloaded.step == 10
    assert not (target / "step-00000030").exists()


def test_checkpoint_prune_keeps_newest_two(s3_bucket, tmp_path):
    store = make_store(s3_bucket)
    lease = store.try_acquire_lease("i-first", FRESH_TTL_S)
    steps = [5, 10, 15, 20]
    for step in steps:
        folder, manifest = write_checkpoint(tmp_path / "local", step=step)
        lease = store.upload_checkpoint(folder, manifest, lease)

    store.prune_checkpoints(keep=2)

    assert store.committed_steps() == [15, 20]
    for step in (5, 10):
        assert list_keys(s3_bucket, checkpoint_key(store, step)) == []
    for step in (15, 20):
        assert len(list_keys(s3_bucket, checkpoint_key(store, step))) == 3
    assert read_latest(s3_bucket, store)["step"] == 20


def test_checkpoint_upload_with_lost_lease(s3_bucket, tmp_path):
    s3, bucket = s3_bucket
    store = make_store(s3_bucket)
    first = store.try_acquire_lease("i-first", SHORT_TTL_S)
    folder, manifest = write_checkpoint(tmp_path / "local", step=10)
    first = store.upload_checkpoint(folder, manifest, first)
    time.sleep(SHORT_TTL_S + 0.3)
    second = store.try_acquire_lease("i-second", SHORT_TTL_S)
    assert second is not None
    folder, manifest = write_checkpoint(tmp_path / "local", step=20)

    with pytest.raises(LeaseLostError):
        store.upload_checkpoint(folder, manifest, first)

    latest = read_latest(s3_bucket, store)
    assert latest["step"] == 10
    assert latest["instance_id"] == "i-first"
    assert store.latest_step() == 10


# Status, events and completion ---------------------------------------------------------


def test_status_roundtrip(s3_bucket):
    store = make_store(s3_bucket)
    status = {"run_id": RUN_ID, "state": "training", "step": 42, "committed_step": 40,
              "crashes": 1}

    assert store.read_status() is None
    store.write_status(status)

    assert store.read_status() == status


def test_events_listed_in_order(s3_bucket):
    store = make_store(s3_bucket)

    store.append_event("instance_started", "i-first", lease_generation=1)
    store.append_event("checkpoint_committed", "i-first", step=10)
    store.append_event("completed", "i-first", step=20)
    events = store.list_events()

    assert [event["type"] for event in events] == [
        "instance_started", "checkpoint_committed", "completed"]
    assert all(event["instance_id"] == "i-first" for event in events)
    assert events[1]["step"] == 10
    assert events[0]["time"] <= events[1]["time"] <= events[2]["time"]


def test_done_marker_roundtrip(s3_bucket):
    s3, bucket = s3_bucket
    store = make_store(s3_bucket)

    assert store.is_done() is False
    store.mark_done({"run_id": RUN_ID, "final_step": 20})

    assert store.is_done() is True
    body = s3.get_object(Bucket=bucket, Key=store.prefix + "DONE")["Body"].read()
    assert json.loads(body) == {"run_id": RUN_ID, "final_step": 20}


# Training data -------------------------------------------------------------------------


def test_fetch_data_from_zip(s3_bucket, tmp_path):
    s3, bucket = s3_bucket
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("train.csv", "x,y\n1,2\n")
        bundle.writestr("nested/", "")
        bundle.writestr("nested/test.csv", "x,y\n3,4\n")
    s3.put_object(Bucket=bucket, Key="assets/data.zip", Body=archive.getvalue())
    destination = tmp_path / "data"

    count = fetch_data(s3, zip_uri=f"s3://{bucket}/assets/data.zip", prefix_uri="",
                       destination=destination)

    assert count == 2
    assert (destination / "train.csv").read_text() == "x,y\n1,2\n"
    assert (destination / "nested" / "test.csv").read_text() == "x,y\n3,4\n"
    assert not (tmp_path / "data.zip").exists()


def test_fetch_data_from_prefix(s3_bucket, tmp_path):
    s3, bucket = s3_bucket
    objects = {
        "datasets/digits/train.csv": b"train",
        "datasets/digits/split/test.csv": b"test",
        "datasets/digits/folder-marker/": b"",
        # Shares the text of the prefix but is another folder.
        "datasets/digits-v2/train.csv": b"other",
    }
    for key, body in objects.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    destination = tmp_path / "data"

    count = fetch_data(s3, zip_uri="", prefix_uri=f"s3://{bucket}/datasets/digits",
                       destination=destination)

    assert count == 2
    assert (destination / "train.csv").read_bytes() == b"train"
    assert (destination / "split" / "test.csv").read_bytes() == b"test"
    assert sorted(path.relative_to(destination).as_posix()
                  for path in destination.rglob("*") if path.is_file()) == [
        "split/test.csv", "train.csv"]
