"""The S3 layout of one run, and the only code that reads or writes it from an instance.

    s3://BUCKET/runs/RUN_ID/
      lease.json                      current owner; conditional writes (If-Match)
      rendezvous.json                 multi-node: current round, endpoint, members
      members/<instance>.json         multi-node: instances ready to train, heartbeat
      failure.json                    multi-node: why a member failed the run
      status.json                     state, step, counts, timestamps, last event
      events/<ns>-<instance>-<type>.json   append-only lifecycle events
      checkpoints/step-NNNNNNNN/...   checkpoint files, manifest.json written last
      checkpoints/latest.json         newest committed checkpoint, moved last
      metrics/progress-<instance>.jsonl   the trainer's progress lines (loss history)
      output/                         final model and metrics
      DONE                            completion marker
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from ml.contract import (
    MANIFEST_NAME,
    Manifest,
    parse_step_folder,
    read_verified_manifest,
    step_folder_name,
)

log = logging.getLogger("spotrun.store")

# Lines of the progress history kept in S3 per instance.
MAX_PROGRESS_LINES = 10_000


class LeaseLostError(RuntimeError):
    """Another instance took the run lease; this one must stop writing at once."""


@dataclass(frozen=True)
class Lease:
    instance_id: str
    generation: int
    etag: str
    # The instance whose stale lease this one took over, if any.
    taken_over_from: str | None = None


def _is_missing(error: ClientError) -> bool:
    return error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


def _is_precondition_failure(error: ClientError) -> bool:
    return error.response.get("Error", {}).get("Code") in (
        "PreconditionFailed", "412", "ConditionalRequestConflict")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"not an S3 URI: {uri!r}")
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def checkpoint_download_config() -> TransferConfig:
    """Return the transfer settings for checkpoint downloads.

    Against the local moto server, boto3's default 8 MiB ranged GETs reached 68-77 MB/s
    and 64 MiB parts four at a time 287 MB/s (docs/benchmarks.md). Resume time is
    mostly this download.
    """
    return TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20,
                          max_concurrency=4)


class _HashingWriter:
    """A write-only file wrapper that computes the size and SHA-256 of what is written.

    It reports itself as not seekable, so s3transfer writes the ranged parts of a
    download in order, and the hash needs no second pass over the file.
    """

    def __init__(self, handle) -> None:
        self._handle = handle
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self._digest.update(data)
        self._handle.write(data)
        self.size += len(data)
        return len(data)

    def seekable(self) -> bool:
        return False

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


class RunStore:
    def __init__(self, s3, bucket: str, run_id: str,
                 transfer_config: TransferConfig | None = None) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.run_id = run_id
        self.prefix = f"runs/{run_id}/"
        # Part size and parallel parts of checkpoint uploads (boto3's defaults unless
        # given). s3transfer aborts a multipart upload that fails, and the bucket's
        # lifecycle rule removes one cut off by a killed process.
        self.transfer_config = transfer_config or TransferConfig()

    # Small JSON objects -------------------------------------------------------------

    def _get_json(self, key: str) -> tuple[dict | None, str | None]:
        try:
            response = self.s3.get_object(Bucket=self.bucket, Key=self.prefix + key)
        except ClientError as error:
            if _is_missing(error):
                return None, None
            raise
        return json.loads(response["Body"].read()), response["ETag"]

    def _put_json(self, key: str, document: dict, **conditions) -> str:
        response = self.s3.put_object(
            Bucket=self.bucket, Key=self.prefix + key,
            Body=json.dumps(document, indent=2, sort_keys=True).encode(),
            ContentType="application/json", **conditions)
        return response["ETag"]

    def read_status(self) -> dict | None:
        return self._get_json("status.json")[0]

    def write_status(self, status: dict) -> None:
        self._put_json("status.json", status)

    def append_event(self, kind: str, instance_id: str, **fields) -> dict:
        now = time.time()
        event = {"type": kind, "time": now, "instance_id": instance_id, **fields}
        key = f"events/{time.time_ns():020d}-{instance_id}-{kind}.json"
        self._put_json(key, event)
        log.info("event %s %s", kind, json.dumps(fields, sort_keys=True))
        return event

    def list_events(self) -> list[dict]:
        events = []
        for key in self._list_keys("events/"):
            response = self.s3.get_object(Bucket=self.bucket, Key=key)
            events.append(json.loads(response["Body"].read()))
        return events

    def is_done(self) -> bool:
        try:
            self.s3.head_object(Bucket=self.bucket, Key=self.prefix + "DONE")
        except ClientError as error:
            if _is_missing(error):
                return False
            raise
        return True

    def mark_done(self, summary: dict) -> None:
        self._put_json("DONE", summary)

    def _list_keys(self, sub_prefix: str) -> list[str]:
        keys = []
        paginator = self.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + sub_prefix):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(keys)

    # Lease ---------------------------------------------------------------------------

    def try_acquire_lease(self, instance_id: str, stale_after_s: float) -> Lease | None:
        """Take the run lease if it is free or stale; return None while another holds it.

        Creation uses If-None-Match and takeover uses If-Match on the stale lease's
        ETag, so of two instances racing for the lease exactly one wins.
        """
        current, etag = self._get_json("lease.json")
        generation = 1
        conditions: dict = {"IfNoneMatch": "*"}
        taken_over_from = None
        if current is not None:
            age = time.time() - float(current.get("renewed_at", 0))
            if current.get("instance_id") != instance_id and age < stale_after_s:
                return None
            generation = int(current.get("generation", 0)) + 1
            conditions = {"IfMatch": etag}
            if current.get("instance_id") != instance_id:
                taken_over_from = current.get("instance_id")
                log.warning("taking over the lease of %s, not renewed for %.0f s",
                            taken_over_from, age)
        document = {"instance_id": instance_id, "generation": generation,
                    "renewed_at": time.time()}
        try:
            new_etag = self._put_json("lease.json", document, **conditions)
        except ClientError as error:
            if _is_precondition_failure(error):
                return None
            raise
        return Lease(instance_id, generation, new_etag, taken_over_from)

    def renew_lease(self, lease: Lease) -> Lease:
        document = {"instance_id": lease.instance_id, "generation": lease.generation,
                    "renewed_at": time.time()}
        try:
            etag = self._put_json("lease.json", document, IfMatch=lease.etag)
        except ClientError as error:
            if _is_precondition_failure(error):
                raise LeaseLostError(
                    f"run lease generation {lease.generation} was taken by another "
                    f"instance") from error
            raise
        return Lease(lease.instance_id, lease.generation, etag, lease.taken_over_from)

    def release_lease(self, lease: Lease) -> None:
        try:
            self.s3.delete_object(Bucket=self.bucket, Key=self.prefix + "lease.json",
                                  IfMatch=lease.etag)
        except ClientError as error:
            if not _is_precondition_failure(error):
                raise
            log.warning("lease generation %d was already taken over; not released",
                        lease.generation)

    # Multi-node rounds ---------------------------------------------------------------

    def register_member(self, instance_id: str, address: str) -> None:
        """Record that an instance without the lease is alive and ready to join a round."""
        self._put_json(f"members/{instance_id}.json",
                       {"instance_id": instance_id, "address": address,
                        "updated_at": time.time()})

    def remove_member(self, instance_id: str) -> None:
        self.s3.delete_object(Bucket=self.bucket,
                              Key=f"{self.prefix}members/{instance_id}.json")

    def fresh_members(self, max_age_s: float) -> list[str]:
        """Return the ids of instances that renewed their member record within max_age_s."""
        now = time.time()
        fresh = []
        for key in self._list_keys("members/"):
            document, _ = self._get_json(key[len(self.prefix):])
            if document is not None and now - float(document.get("updated_at", 0)) < max_age_s:
                fresh.append(str(document["instance_id"]))
        return fresh

    def record_failure(self, failure: dict) -> None:
        """Record why a member failed the run; the leader ends the run with it."""
        self._put_json("failure.json", {**failure, "time": time.time()})

    def read_failure(self) -> dict | None:
        return self._get_json("failure.json")[0]

    def read_rendezvous(self) -> dict | None:
        return self._get_json("rendezvous.json")[0]

    def publish_rendezvous(self, document: dict) -> None:
        self._put_json("rendezvous.json", document)

    # Checkpoints -------------------------------------------------------------------

    def upload_checkpoint(self, folder: Path, manifest: Manifest, lease: Lease) -> Lease:
        """Upload a committed local checkpoint; return the renewed lease.

        Order is the commit protocol: every file, then the folder's manifest, then
        ``latest.json``. The lease is renewed (If-Match) just before ``latest.json``
        moves, so an instance that lost the lease never publishes a checkpoint.
        """
        started = time.monotonic()
        for item in manifest.files:
            self._upload_checkpoint_file(folder / item.name)
        return self._commit_checkpoint(folder, manifest, lease, started)

    def _upload_checkpoint_file(self, path: Path) -> None:
        """Upload one file of the checkpoint folder ``path.parent``, without committing it.

        A caller may upload the files of a folder while the trainer still writes it,
        and must call ``_commit_checkpoint`` only after every upload has returned.
        """
        key = f"{self.prefix}checkpoints/{path.parent.name}/{path.name}"
        self.s3.upload_file(str(path), self.bucket, key, Config=self.transfer_config)

    def _commit_checkpoint(self, folder: Path, manifest: Manifest, lease: Lease,
                           started: float) -> Lease:
        """Upload the manifest, renew the lease and move ``latest.json``, and return the lease.

        Every file of ``manifest`` must already be in S3. ``started`` is the
        ``time.monotonic()`` of the first file upload, for the log line.
        """
        key_prefix = f"{self.prefix}checkpoints/{folder.name}/"
        self.s3.upload_file(str(folder / MANIFEST_NAME), self.bucket,
                            key_prefix + MANIFEST_NAME, Config=self.transfer_config)
        lease = self.renew_lease(lease)
        self._put_json("checkpoints/latest.json", {
            "step": manifest.step, "epoch": manifest.epoch, "folder": folder.name,
            "instance_id": lease.instance_id, "lease_generation": lease.generation,
            "committed_at": time.time()})
        total_bytes = sum(item.size for item in manifest.files)
        log.info("checkpoint step %d committed to S3 (%d bytes in %.2f s)", manifest.step,
                 total_bytes, time.monotonic() - started)
        return lease

    def committed_steps(self) -> list[int]:
        """Return steps whose folder has a manifest in S3, oldest first."""
        steps = set()
        for key in self._list_keys("checkpoints/"):
            parts = key[len(self.prefix + "checkpoints/"):].split("/")
            if len(parts) == 2 and parts[1] == MANIFEST_NAME:
                step = parse_step_folder(parts[0])
                if step is not None:
                    steps.add(step)
        return sorted(steps)

    def latest_step(self) -> int | None:
        latest, _ = self._get_json("checkpoints/latest.json")
        return int(latest["step"]) if latest else None

    def prune_checkpoints(self, keep: int) -> None:
        """Delete committed checkpoints older than the newest ``keep``.

        A folder loses its manifest first, so a failure halfway leaves an uncommitted
        folder (ignored by resume), never a committed one with missing files.
        """
        latest = self.latest_step()
        if latest is None:
            return
        committed = [step for step in self.committed_steps() if step <= latest]
        for step in committed[:-keep]:
            key_prefix = f"{self.prefix}checkpoints/{step_folder_name(step)}/"
            self.s3.delete_object(Bucket=self.bucket, Key=key_prefix + MANIFEST_NAME)
            for key in self._list_keys(f"checkpoints/{step_folder_name(step)}/"):
                self.s3.delete_object(Bucket=self.bucket, Key=key)
            log.info("pruned checkpoint step %d", step)

    def download_newest_checkpoint(self, local_dir: Path) -> Manifest | None:
        """Download the newest checkpoint that verifies; skip torn ones with a warning.

        Candidates are the step in ``latest.json`` and every folder with a manifest,
        newest first. A candidate verifies when every file listed in its manifest is
        present with the listed size and SHA-256.
        """
        candidates = set(self.committed_steps())
        latest = self.latest_step()
        if latest is not None:
            candidates.add(latest)
        for step in sorted(candidates, reverse=True):
            folder = local_dir / step_folder_name(step)
            if self._download_folder(step, folder):
                # _download_folder compared every file's SHA-256 while writing it.
                manifest = read_verified_manifest(folder, check_hashes=False)
                if manifest is not None:
                    return manifest
            log.warning("checkpoint step %d in S3 is incomplete or corrupt; skipping it",
                        step)
            # Remove the partial copy, so the trainer rewrites this step and the
            # supervisor uploads the new one in its place.
            shutil.rmtree(folder, ignore_errors=True)
        return None

    def download_checkpoint(self, step: int, local_dir: Path) -> Manifest | None:
        """Download one committed step and return its manifest, or None if it does not verify."""
        folder = local_dir / step_folder_name(step)
        if self._download_folder(step, folder):
            # _download_folder compared every file's SHA-256 while writing it.
            manifest = read_verified_manifest(folder, check_hashes=False)
            if manifest is not None:
                return manifest
        shutil.rmtree(folder, ignore_errors=True)
        return None

    def _download_folder(self, step: int, folder: Path) -> bool:
        """Download one folder, and return False when a file is missing or differs from the manifest."""
        key_prefix = f"{self.prefix}checkpoints/{step_folder_name(step)}/"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            response = self.s3.get_object(Bucket=self.bucket, Key=key_prefix + MANIFEST_NAME)
            manifest = Manifest.from_json(response["Body"].read().decode())
        except ClientError as error:
            if _is_missing(error):
                return False
            raise
        except ValueError as error:
            log.warning("checkpoint step %d: %s", step, error)
            return False
        for item in manifest.files:
            try:
                with open(folder / item.name, "wb") as handle:
                    target = _HashingWriter(handle)
                    self.s3.download_fileobj(self.bucket, key_prefix + item.name, target,
                                             Config=checkpoint_download_config())
            except ClientError as error:
                if _is_missing(error):
                    return False
                raise
            if target.size != item.size or target.hexdigest() != item.sha256:
                log.warning("checkpoint step %d: %s has %d bytes and SHA-256 %s in S3, but its "
                            "manifest lists %d bytes and SHA-256 %s", step, item.name, target.size,
                            target.hexdigest(), item.size, item.sha256)
                return False
        (folder / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        return True

    # Progress history ------------------------------------------------------------------

    def upload_progress(self, instance_id: str, path: Path) -> None:
        """Copy the trainer's progress lines to ``metrics/progress-<instance_id>.jsonl``.

        Only whole lines are copied. Beyond MAX_PROGRESS_LINES, every k-th line and the
        last one are kept, so the object stays small on long runs.
        """
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return
        lines = data[:data.rfind(b"\n") + 1].splitlines()
        if len(lines) > MAX_PROGRESS_LINES:
            stride = -(-len(lines) // MAX_PROGRESS_LINES)
            lines = lines[::stride] + ([lines[-1]] if (len(lines) - 1) % stride else [])
        self.s3.put_object(Bucket=self.bucket,
                           Key=f"{self.prefix}metrics/progress-{instance_id}.jsonl",
                           Body=b"\n".join(lines) + b"\n", ContentType="application/x-ndjson")

    # Data and output ---------------------------------------------------------------

    def upload_output(self, folder: Path) -> list[str]:
        keys = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            key = f"{self.prefix}output/{path.relative_to(folder).as_posix()}"
            self.s3.upload_file(str(path), self.bucket, key)
            keys.append(key)
        return keys


def fetch_data(s3, *, zip_uri: str, prefix_uri: str, destination: Path) -> int:
    """Copy the training data to ``destination``; return the number of files."""
    destination.mkdir(parents=True, exist_ok=True)
    if zip_uri:
        bucket, key = parse_s3_uri(zip_uri)
        archive = destination.parent / "data.zip"
        s3.download_file(bucket, key, str(archive))
        with zipfile.ZipFile(archive) as bundle:
            bundle.extractall(destination)
            count = len([name for name in bundle.namelist() if not name.endswith("/")])
        archive.unlink()
        return count
    bucket, prefix = parse_s3_uri(prefix_uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    count = 0
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            relative = item["Key"][len(prefix):]
            if not relative or relative.endswith("/"):
                continue
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, item["Key"], str(target))
            count += 1
    return count
