"""The service's batch records and tokens, on a real store (disk and moto S3): what makes a
batch screened once, in order per center, and taken over when its worker dies."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import numpy as np
import pytest
from toy_models import stand_in_classifier

from smartccs.errors import CCSError
from smartccs.results.schema import SLIDE_STATUSES
from smartccs.screening.adequacy import AdequacyConfig
from smartccs.screening.bags import SlideBag
from smartccs.screening.slides import slides_table
from smartccs.service.api import BatchStatus
from smartccs.service.auth import TokenBook, new_token, token_digest
from smartccs.service.records import BatchQueue, BatchRecord, SlideProgress, batch_id
from smartccs.service.worker import slide_status


def _record(center: str, batch: str, t: float) -> BatchRecord:
    return BatchRecord(batch_id=batch_id(center, batch), center=center, batch=batch, submitted_at=t)


def test_submitting_twice_finds_the_first_record(any_store):
    q = BatchQueue(any_store)
    first, created = q.register(_record("c1", "b1", 1.0))
    assert created
    again, created = q.register(_record("c1", "b1", 2.0))
    assert not created and again.submitted_at == 1.0 and again.batch_id == first.batch_id
    assert [r.batch_id for r in q.unfinished()] == [first.batch_id]


def test_a_resubmission_is_answered_without_a_write(any_store, monkeypatch):
    """A burst of resubmissions costs reads only: the create-if-absent write (durable, so
    slow) is left to a batch's first submission."""
    q = BatchQueue(any_store)
    q.register(_record("c1", "b1", 1.0))
    writes = []
    monkeypatch.setattr(any_store, "put_if_absent", lambda *a, **k: writes.append(a) or True)
    again, created = q.register(_record("c1", "b1", 2.0))
    assert not created and again.submitted_at == 1.0 and writes == []
    _, created = q.register(_record("c1", "b2", 3.0))
    assert created and len(writes) == 1, "a new batch is still created by put_if_absent"


def test_a_claim_is_won_once(any_store):
    q = BatchQueue(any_store)
    record, _ = q.register(_record("c1", "b1", 1.0))
    won = q.claim(record, "w1")
    assert won is not None and won.state == "running" and won.attempts == 1
    assert q.claim(record, "w2") is None, "the same attempt cannot be claimed twice"
    assert q.get(record.batch_id).worker == "w1"


def test_a_center_runs_one_batch_at_a_time_in_submission_order(local_store):
    q = BatchQueue(local_store)
    for center, batch, t in (("c1", "b2", 2.0), ("c1", "b1", 1.0), ("c2", "b1", 3.0)):
        q.register(_record(center, batch, t))
    assert [(r.center, r.batch) for r in q.claimable()] == [("c1", "b1"), ("c2", "b1")]
    q.claim(q.get(batch_id("c1", "b1")), "w1")
    assert [(r.center, r.batch) for r in q.claimable()] == [("c2", "b1")], "c1 is busy"
    done = q.get(batch_id("c1", "b1")).model_copy(update={"state": "done"})
    q.save(done)
    assert ("c1", "b2") in [(r.center, r.batch) for r in q.claimable()]


def test_a_silent_worker_s_batch_is_taken_over_as_the_next_attempt(local_store):
    q = BatchQueue(local_store, lease_s=5)
    record, _ = q.register(_record("c1", "b1", 1.0))
    running = q.claim(record, "w1")
    assert q.claimable() == []
    q.save(running.model_copy(update={"heartbeat": time.time() - 60}))  # w1 died a minute ago
    [stale] = q.claimable()
    taken = q.claim(stale, "w2")
    assert taken is not None and taken.attempts == 2 and taken.worker == "w2"


def _bag(slide_id: str, squamous: int, read: int = 4, rejected: bool = False) -> SlideBag:
    k = 2
    return SlideBag(
        "c", "b", slide_id, np.zeros((6, k, 4), np.float32), np.zeros((6, k), np.float32),
        np.full((6, k, 4), np.nan), np.zeros((6, k), bool), n_tiles=4, tiles_read=read,
        n_squamous=squamous, slide_area_mm2=1.0, rejected=rejected,
        errors=[] if read else ["every tile failed"],
    )  # fmt: skip


def test_a_slide_s_progress_status_is_the_one_its_table_row_gets():
    """Issue 27: the service said ``scored`` for a slide the slides table calls
    ``inadequate``. A worker's live status for each slide is the table's."""
    classifier = stand_in_classifier()
    bags = [
        _bag("ok", 150),
        _bag("sparse", 10),
        _bag("unread", 0, read=0),
        _bag("glass", 0, read=0, rejected=True),
    ]
    adequacy = AdequacyConfig()  # 16 squamous cells for a 1 mm² slide
    table = slides_table(
        bags, np.full((4, 7), 1 / 7, np.float32), run_id="r", classifier=classifier,
        adequacy=adequacy,
    )  # fmt: skip
    rows = [r["status"] for r in table.to_pylist()]
    assert rows == ["screened", "inadequate", "failed", "rejected"]
    assert [slide_status(b, adequacy) for b in bags] == rows
    assert set(SlideProgress.model_fields["status"].annotation.__args__) == {
        "pending",
        *SLIDE_STATUSES,
    }


def test_the_status_body_has_the_table_s_statuses_and_iso_8601_utc_times():
    """Issue 27: the status body's times were epoch floats. They are ISO 8601 UTC strings, and
    a record stored before (epoch floats, ``scored``) is read and answered the same way."""
    stored = {
        "batch_id": batch_id("c1", "b1"), "center": "c1", "batch": "b1", "state": "done",
        "submitted_at": 1_790_000_000.25, "started_at": 1_790_000_001.0,
        "finished_at": 1_790_000_060.5, "heartbeat": 1_790_000_060.5,
        "slides": [{"slide_id": "s1", "status": "scored"}, {"slide_id": "s2", "status": "failed"}],
    }  # fmt: skip
    record = BatchRecord.model_validate_json(json.dumps(stored))
    assert [s.status for s in record.slides] == ["screened", "failed"]
    body = json.loads(
        BatchStatus(**record.model_dump(), slides_total=2, slides_done=2).model_dump_json()
    )
    assert body["submitted_at"] == "2026-09-21T14:13:20.250000Z"
    for name in ("submitted_at", "started_at", "finished_at", "heartbeat"):
        when = datetime.fromisoformat(body[name])
        assert when.tzinfo == UTC and when.timestamp() == stored[name], name
    assert [s["status"] for s in body["slides"]] == ["screened", "failed"]
    fresh = BatchStatus(**_record("c1", "b2", time.time()).model_dump(), slides_total=0,
                        slides_done=0)  # fmt: skip
    assert json.loads(fresh.model_dump_json())["started_at"] is None


def test_tokens_are_kept_as_digests_and_name_one_center(tmp_path, monkeypatch):
    t1, d1 = new_token()
    t2, d2 = new_token()
    secret = tmp_path / "tokens.json"
    secret.write_text(json.dumps({"c2": d2}))
    book = TokenBook.load({"c1": d1}, str(secret))
    assert book.center_of(t1) == "c1" and book.center_of(t2) == "c2"
    assert book.center_of("guess") is None and book.center_of(d1) is None
    assert token_digest(t1) == d1 and t1 not in secret.read_text()
    monkeypatch.setenv("CCS_SERVICE_TOKENS", json.dumps({"c3": d1}))
    assert TokenBook.load({}).center_of(t1) == "c3"


@pytest.mark.parametrize(
    "digests, field", [({"c1": "short"}, "c1"), ({"../x": "0" * 64}, "center")]
)
def test_bad_token_entries_name_the_entry(digests, field):
    with pytest.raises(CCSError, match=field):
        TokenBook(digests)
