"""The service's batch records and tokens, on a real store (disk and moto S3): what makes a
batch screened once, in order per center, and taken over when its worker dies."""

from __future__ import annotations

import json
import time

import pytest

from smartccs.errors import CCSError
from smartccs.service.auth import TokenBook, new_token, token_digest
from smartccs.service.records import BatchQueue, BatchRecord, batch_id


def _record(center: str, batch: str, t: float) -> BatchRecord:
    return BatchRecord(batch_id=batch_id(center, batch), center=center, batch=batch, submitted_at=t)


def test_submitting_twice_finds_the_first_record(any_store):
    q = BatchQueue(any_store)
    first, created = q.register(_record("c1", "b1", 1.0))
    assert created
    again, created = q.register(_record("c1", "b1", 2.0))
    assert not created and again.submitted_at == 1.0 and again.batch_id == first.batch_id
    assert [r.batch_id for r in q.unfinished()] == [first.batch_id]


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
