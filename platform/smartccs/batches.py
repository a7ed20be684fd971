"""Incoming batches in the store: commit, list and load (DESIGN.md, Contracts: Store).

A batch lives under ``incoming/<center>/<batch>/``: the slide files at the paths its manifest
names, ``manifest.json``, and a ``_COMMITTED`` marker written last with create-if-absent. Only a
batch with a marker exists for readers; the marker pins the manifest's sha256, so a manifest
rewritten after the commit is detected rather than trusted. While an upload is in flight it
holds an ``_UPLOADING`` lease so two uploaders of one batch cannot interleave their objects.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict

from smartccs import layout
from smartccs.checksums import data_sha256, sha256_stream
from smartccs.commits import read_commit, read_pinned
from smartccs.errors import AlreadyCommittedError, ManifestError, StoreError
from smartccs.manifest import MANIFEST_NAME, Manifest
from smartccs.store import Store

UPLOAD_LEASE = "_UPLOADING"
LEASE_SECONDS = 6 * 3600
"""An upload lease older than this is taken to belong to a crashed upload and may be broken."""


class CommitRecord(BaseModel):
    """Content of a batch's commit marker."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    center: str
    batch: str
    manifest_sha256: str
    slides: int
    bytes: int
    committed_at: str


class BatchRef(BaseModel):
    """A committed batch: where it is and what it holds."""

    model_config = ConfigDict(frozen=True)

    center: str
    batch: str
    prefix: str
    manifest: Manifest

    def slide_key(self, path: str) -> str:
        return f"{self.prefix}/{path}"


def is_committed(store: Store, center: str, batch: str) -> bool:
    return store.exists(layout.incoming(center, batch), layout.COMMIT_MARKER)


class UploadLease:
    """Exclusive right to write a batch's objects until it is committed or released."""

    def __init__(self, store: Store, center: str, batch: str):
        self.store = store
        self.prefix = layout.incoming(center, batch)
        self.token = uuid.uuid4().hex
        self.key = f"{self.prefix}/{UPLOAD_LEASE}"

    def __enter__(self) -> UploadLease:
        body = json.dumps({"token": self.token, "started": time.time()}).encode()
        if self.store.put_if_absent(self.key, body):
            return self
        try:
            held = json.loads(self.store.read_bytes(self.key))
            age = time.time() - float(held["started"])
        except (StoreError, ValueError, KeyError, TypeError):
            age = float("inf")  # unreadable lease: treat as stale
        if age < LEASE_SECONDS:
            raise StoreError(
                f"{self.store.uri(self.prefix)}: another upload of this batch is in progress "
                f"(started {age:.0f} s ago); wait for it or retry after {LEASE_SECONDS} s"
            )
        self.store.delete(self.key)  # stale lease from a crashed upload
        if not self.store.put_if_absent(self.key, body):
            raise StoreError(f"{self.store.uri(self.prefix)}: lost the race for the upload lease")
        return self

    def __exit__(self, *exc: object) -> None:
        self.store.delete(self.key)


def commit_batch(store: Store, manifest: Manifest, *, verify_checksums: bool = False) -> BatchRef:
    """Make an uploaded batch visible: check its objects against the manifest, write the marker.

    Called by ``ccs upload`` after it has copied the slides, and usable on a batch put in place
    by any S3 client. Sizes are always checked; sha256 too when ``verify_checksums``.
    """
    prefix = layout.incoming(manifest.center, manifest.batch)
    if is_committed(store, manifest.center, manifest.batch):
        raise AlreadyCommittedError(
            f"{store.uri(prefix)} is already committed; batches are never overwritten, "
            "upload under a new batch id"
        )
    problems = []
    total = 0
    for s in manifest.slides:
        key = f"{prefix}/{s.path}"
        try:
            size = store.fs.size(store.path(key))
        except FileNotFoundError:
            problems.append(f"{s.path}: missing from {store.uri(prefix)}")
            continue
        total += size
        if size != s.bytes:
            problems.append(f"{s.path}: {size} bytes in the store, manifest says {s.bytes}")
        elif verify_checksums and _store_sha256(store, key) != s.sha256:
            problems.append(f"{s.path}: sha256 in the store differs from the manifest")
    if problems:
        raise ManifestError("batch does not match its manifest:\n" + "\n".join(problems))
    data = manifest.dumps()
    store.write_bytes(f"{prefix}/{MANIFEST_NAME}", data)
    record = CommitRecord(
        center=manifest.center,
        batch=manifest.batch,
        manifest_sha256=hashlib.sha256(data).hexdigest(),
        slides=len(manifest.slides),
        bytes=total,
        committed_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    marker = f"{prefix}/{layout.COMMIT_MARKER}"
    if not store.put_if_absent(marker, record.model_dump_json().encode()):
        raise AlreadyCommittedError(f"{store.uri(prefix)} was committed by someone else meanwhile")
    return BatchRef(center=manifest.center, batch=manifest.batch, prefix=prefix, manifest=manifest)


def load_batch(store: Store, center: str, batch: str) -> BatchRef:
    """A committed batch; an uncommitted or tampered one is an error, never half-read."""
    prefix = layout.incoming(center, batch)
    record = read_commit(store, prefix, CommitRecord, "batch")
    data = read_pinned(
        store, prefix, MANIFEST_NAME, record.manifest_sha256, "batch", error=ManifestError
    )
    manifest = Manifest.loads(data, store.uri(prefix, MANIFEST_NAME))
    if (manifest.center, manifest.batch) != (center, batch):
        raise ManifestError(
            f"{store.uri(prefix, MANIFEST_NAME)} names center/batch "
            f"{manifest.center}/{manifest.batch}, but lives under {center}/{batch}"
        )
    return BatchRef(center=center, batch=batch, prefix=prefix, manifest=manifest)


def list_batches(store: Store, center: str | None = None) -> list[tuple[str, str]]:
    """(center, batch) of every committed batch, optionally of one center."""
    centers = [center] if center else store.list_dirs("incoming")
    found = []
    for c in centers:
        for b in store.list_dirs("incoming", c):
            try:
                committed = is_committed(store, c, b)
            except ValueError:  # a folder whose name is not a valid id is not ours
                continue
            if committed:
                found.append((c, b))
    return found


def resolve_batches(store: Store, names: list[str]) -> list[BatchRef]:
    """Committed batches named ``center/batch`` (every committed batch when ``names`` is empty)."""
    if names:
        pairs = []
        for item in names:
            center, sep, batch = item.partition("/")
            if not sep:
                raise ManifestError(f"batches: {item!r} is not 'center/batch'")
            pairs.append((center, batch))
    else:
        pairs = list_batches(store)
    if not pairs:
        raise ManifestError(f"no committed batches in {store.uri('incoming')}")
    return [load_batch(store, c, b) for c, b in pairs]


def manifests_sha256(store: Store, refs: list[BatchRef]) -> str:
    """One hash for a set of batches (a training set): their pinned manifests, sorted."""
    return data_sha256(
        [read_commit(store, r.prefix, CommitRecord, "batch").manifest_sha256 for r in refs]
    )


def _store_sha256(store: Store, key: str) -> str:
    with store.open_input(key) as f:
        return sha256_stream(f)
