"""Service batches as records in the store, so their status outlives any replica.

``runs/service/batches/<batch_id>.json`` holds a batch's state (queued, running, done,
failed), per-slide progress, its attempts and the run that published it. A batch id is a
digest of center and batch, so submitting the same upload twice finds the same record and
the batch is screened once. A worker takes a batch by creating ``<batch_id>.claim-<attempt>``
(create-if-absent: two workers cannot both win) and keeps a heartbeat in the record; a running
batch whose heartbeat is older than the lease is taken over as the next attempt.
"""

from __future__ import annotations

import hashlib
import re
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from smartccs.adaptation.config import Method
from smartccs.errors import StoreError
from smartccs.ids import batch_key
from smartccs.results.schema import SLIDE_STATUSES, STATUS_SCREENED
from smartccs.store import Store

PREFIX = "runs/service/batches"
State = Literal["queued", "running", "done", "failed"]
FINAL_STATES: tuple[State, ...] = ("done", "failed")
"""A batch in one of these states changes no more."""
SlideState = Literal[("pending", *SLIDE_STATUSES)]  # type: ignore[valid-type]
"""``pending``, then the slide's ``status`` in the slides table (results/schema.py)."""

_LEGACY_STATUS = {"scored": STATUS_SCREENED}
"""Records written before the statuses were the table's said ``scored`` for a scored slide."""


_BATCH_ID = re.compile(r"b-[0-9a-f]{20}")


def batch_id(center: str, batch: str) -> str:
    return "b-" + hashlib.sha256(batch_key(center, batch).encode()).hexdigest()[:20]


def is_batch_id(value: str) -> bool:
    """Whether ``value`` could be a batch id: anything else never becomes a store key."""
    return bool(_BATCH_ID.fullmatch(value))


class SlideProgress(BaseModel):
    slide_id: str
    status: SlideState = "pending"
    """``pending`` until the slide is read, then its status in the slides table: ``screened``,
    ``inadequate`` (scored, too few squamous cells), ``failed`` or ``rejected`` (not a cytology
    preparation: blank, tissue, almost no cells; no score)."""
    error: str | None = None

    @field_validator("status", mode="before")
    @classmethod
    def _legacy(cls, value: object) -> object:
        return _LEGACY_STATUS.get(value, value) if isinstance(value, str) else value


class BatchRecord(BaseModel):
    """One submitted batch: the queue's entry, and the status API's body (whose times are ISO
    8601 UTC strings, ``api.BatchStatus``; here they are epoch seconds, for the lease)."""

    model_config = ConfigDict(extra="forbid")

    batch_id: str
    center: str
    batch: str
    state: State = "queued"
    adapt: Method = "none"
    submitted_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    heartbeat: float | None = None
    attempts: int = 0
    worker: str | None = None
    run_id: str | None = None
    adaptation: str | None = None
    error: str | None = None
    slides: list[SlideProgress] = Field(default_factory=list)
    summary: dict[str, int] = Field(default_factory=dict)


class BatchQueue:
    """The records under ``runs/service/batches/`` of one store."""

    def __init__(self, store: Store, lease_s: float = 300.0):
        self.store, self.lease_s = store, lease_s
        self._done: set[str] = set()  # done is final: not re-read on every poll

    def _key(self, bid: str) -> str:
        return f"{PREFIX}/{bid}.json"

    def register(self, record: BatchRecord) -> tuple[BatchRecord, bool]:
        """Create the record unless the batch was submitted before; (record, created).

        A known batch is answered from its record, without a write: most of a burst of
        submissions are resubmissions, and each create attempt costs a durable write."""
        known = self.find(record.batch_id)
        if known is not None:
            return known, False
        if self.store.put_if_absent(self._key(record.batch_id), record.model_dump_json().encode()):
            return record, True
        return self.get(record.batch_id), False

    def get(self, bid: str) -> BatchRecord:
        return BatchRecord.model_validate_json(self.store.read_bytes(self._key(bid)))

    def find(self, bid: str) -> BatchRecord | None:
        if not is_batch_id(bid):  # a URL's path segment: never let it near a store key
            return None
        try:
            return self.get(bid)
        except (StoreError, FileNotFoundError):
            return None

    def save(self, record: BatchRecord) -> None:
        self.store.write_bytes(self._key(record.batch_id), record.model_dump_json().encode())

    def unfinished(self) -> list[BatchRecord]:
        """Every record not known to be done (done is final, so a worker's polls stop
        re-reading a batch once they have seen it done)."""
        try:
            names = self.store.list(PREFIX)
        except (StoreError, FileNotFoundError):
            return []
        out = []
        for name in names:
            base = name.rsplit("/", 1)[-1]
            bid = base[: -len(".json")]
            if base.endswith(".json") and not base.startswith(".") and bid not in self._done:
                found = self.find(bid)
                if found:
                    out.append(found)
                    if found.state == "done":
                        self._done.add(bid)
        return out

    def stale(self, record: BatchRecord, now: float | None = None) -> bool:
        now = now or time.time()
        return record.state == "running" and (record.heartbeat or 0) < now - self.lease_s

    def claimable(self) -> list[BatchRecord]:
        """Queued batches and running ones whose worker went silent, oldest first; at most one
        per center and none of a center with a live batch, so a center adapts in order."""
        records = sorted(self.unfinished(), key=lambda r: r.submitted_at)
        busy = {r.center for r in records if r.state == "running" and not self.stale(r)}
        out, seen = [], set()
        for r in records:
            if r.center in busy or r.center in seen:
                continue
            if r.state == "queued" or self.stale(r):
                out.append(r)
                seen.add(r.center)
        return out

    def claim(self, record: BatchRecord, worker: str) -> BatchRecord | None:
        """Take the batch for its next attempt; None if another worker took it first."""
        attempt = record.attempts + 1
        claim = f"{PREFIX}/{record.batch_id}.claim-{attempt}"
        if not self.store.put_if_absent(claim, worker.encode()):
            return None
        now = time.time()
        record = record.model_copy(
            update={
                "state": "running",
                "attempts": attempt,
                "worker": worker,
                "started_at": now,
                "heartbeat": now,
                "error": None,
            }
        )
        self.save(record)
        return record
