"""Incoming batches in the store: commit, list and load (docs/store.md, docs/architecture.md).

A batch lives under ``incoming/<center>/<batch>/``: the slide files at the paths its manifest
names, ``manifest.json``, and a ``_COMMITTED`` marker written last with create-if-absent. Only a
batch with a marker exists for readers; the marker pins the manifest's sha256, so a manifest
rewritten after the commit is detected rather than trusted. While an upload is in flight it
holds an ``_UPLOADING`` lease so two uploaders of one batch cannot interleave their objects.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict

from smartccs import layout
from smartccs.checksums import data_sha256
from smartccs.commits import read_commit, read_pinned
from smartccs.errors import AlreadyCommittedError, ManifestError, StoreError, printable
from smartccs.manifest import MANIFEST_NAME, Manifest
from smartccs.store import Store

log = logging.getLogger(__name__)

UPLOAD_LEASE = "_UPLOADING"
LEASE_EXPIRY_S = 60.0
"""An upload lease whose heartbeat is older than this belongs to a dead upload and is broken
by the next upload of the batch (docs/store.md)."""
HEARTBEAT_S = 10.0
"""How often a live upload renews its lease: six beats fit in one expiry, so a store hiccup of
a few beats does not cost a live upload its lease."""


class LeaseBody(BaseModel):
    """Content of ``_UPLOADING``: who holds the batch, and when they last said so."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token: str
    host: str
    pid: int
    started: float
    beat: float


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


class LeaseLostError(StoreError):
    """This upload's lease was broken and taken by another upload: it must stop writing."""


class UploadLease:
    """Exclusive right to write a batch's objects until it is committed or released.

    The holder rewrites the lease every ``HEARTBEAT_S``; a lease is stale, and the next upload
    breaks it, when its last beat is older than ``LEASE_EXPIRY_S`` or when it names a process
    of this host that no longer runs (a SIGKILLed upload is resumed at once from the same
    machine). ``break_lease`` breaks a live-looking lease too: for an operator who knows its
    holder is gone.
    """

    def __init__(
        self,
        store: Store,
        center: str,
        batch: str,
        *,
        break_lease: bool = False,
        expiry_s: float = LEASE_EXPIRY_S,
        heartbeat_s: float = HEARTBEAT_S,
    ):
        self.store = store
        self.prefix = layout.incoming(center, batch)
        self.key = f"{self.prefix}/{UPLOAD_LEASE}"
        self.break_lease = break_lease
        self.expiry_s = expiry_s
        self.heartbeat_s = heartbeat_s
        now = time.time()
        self.body = LeaseBody(
            token=uuid.uuid4().hex,
            host=socket.gethostname(),
            pid=os.getpid(),
            started=now,
            beat=now,
        )
        self._stop = threading.Event()
        self._lost = False
        self._beater: threading.Thread | None = None

    def __enter__(self) -> UploadLease:
        if not self.store.put_if_absent(self.key, self.body.model_dump_json().encode()):
            self._take_over()
        self._beater = threading.Thread(target=self._beat, name=f"lease {self.key}", daemon=True)
        self._beater.start()
        return self

    def _take_over(self) -> None:
        try:
            raw = self.store.read_bytes(self.key)
        except StoreError:  # released since we tried
            raw = None
        if raw is not None:
            held = _parse_lease(raw)
            why = self._stale(held)
            if why is None and not self.break_lease:
                assert held is not None
                raise StoreError(
                    f"{self.store.uri(self.prefix)}: another upload of this batch is in progress "
                    f"(pid {held.pid} on {printable(held.host)}, last heartbeat "
                    f"{time.time() - held.beat:.0f} s ago); wait for it, or if it is dead run "
                    f"again after {self.expiry_s:.0f} s without a heartbeat or with --break-lease"
                )
            log.warning("breaking the upload lease of %s: %s", self.prefix, why or "--break-lease")
            # delete only what we judged stale: a lease taken meanwhile is someone else's
            if self.store.read_bytes_or_none(self.key) == raw:
                self.store.delete(self.key)
        if not self.store.put_if_absent(self.key, self.body.model_dump_json().encode()):
            raise StoreError(f"{self.store.uri(self.prefix)}: lost the race for the upload lease")

    def _stale(self, held: LeaseBody | None) -> str | None:
        """Why ``held`` belongs to a dead upload, or None if it may be alive."""
        if held is None:
            return "unreadable lease"
        age = time.time() - held.beat
        if age > self.expiry_s:
            return f"no heartbeat for {age:.0f} s"
        if held.host == self.body.host and not _pid_alive(held.pid):
            return f"pid {held.pid} on this host is gone"
        return None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.check()
                body = self.body.model_copy(update={"beat": time.time()})
                self.store.write_bytes(self.key, body.model_dump_json().encode())
            except LeaseLostError:
                log.error("the upload lease of %s was taken by another upload", self.prefix)
                return
            except Exception as exc:  # a store hiccup: the next beat may land
                log.warning("lease heartbeat of %s failed: %s", self.prefix, exc)

    def check(self) -> None:
        """Raise :class:`LeaseLostError` unless the lease in the store is still ours."""
        if not self._lost:
            raw = self.store.read_bytes_or_none(self.key)
            held = _parse_lease(raw) if raw is not None else None
            self._lost = held is None or held.token != self.body.token
        if self._lost:
            raise LeaseLostError(
                f"{self.store.uri(self.prefix)}: this upload's lease was broken and another "
                "upload holds the batch now; nothing of this upload was committed"
            )

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._beater is not None:
            self._beater.join()
        with contextlib.suppress(LeaseLostError):
            self.check()
            self.store.delete(self.key)


def _parse_lease(raw: bytes) -> LeaseBody | None:
    try:
        return LeaseBody.model_validate_json(raw)
    except ValueError:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def commit_batch(store: Store, manifest: Manifest, *, verify_checksums: bool = True) -> BatchRef:
    """Make an uploaded batch visible: check its objects against the manifest, write the marker.

    Usable on a batch put in place by any S3 client. Every object's size and sha256 are
    checked against the manifest (sha256 from S3's own full-object SHA-256 checksum where the
    client set one, else from a read), so a committed batch holds what its manifest says.
    ``ccs upload`` passes ``verify_checksums=False``: it hashed each object from the very bytes
    it sent, under its lease.
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
        elif verify_checksums and store.sha256(key) != s.sha256:
            problems.append(f"{s.path}: sha256 in the store differs from the manifest")
    if problems:
        raise ManifestError(
            "batch does not match its manifest:\n" + "\n".join(map(printable, problems))
        )
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
