"""Properties of the models that cross a trust boundary: the manifest a center uploads and the
service API's bodies.

Valid models survive a JSON round trip unchanged; junk of any shape is refused only with
pydantic's ``ValidationError`` (or ``ManifestError`` from ``Manifest.loads``), never a crash
or another exception; a value that passes id or path validation never leaves its prefix once it
is a store key. Example counts come from the hypothesis profile in conftest.py (50 by default;
``HYPOTHESIS_PROFILE=thorough`` for more).
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from smartccs import layout
from smartccs.errors import InvalidIdError, ManifestError
from smartccs.ids import validate_id
from smartccs.manifest import Manifest, SlideEntry
from smartccs.results.schema import SLIDE_STATUSES
from smartccs.service.api import SubmitBatch
from smartccs.service.records import PREFIX as QUEUE_PREFIX
from smartccs.service.records import (
    BatchQueue,
    BatchRecord,
    SlideProgress,
    batch_id,
    is_batch_id,
)
from smartccs.store import Store, StoreConfig
from smartccs.taxonomy import GRADES

# --- strategies ----------------------------------------------------------------------------

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True).filter(
    lambda s: ".." not in s
)
"""Every id the platform accepts, dots, dashes and full length included."""

segments = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9 ._()-]{0,30}", fullmatch=True).filter(
    lambda s: s not in (".", "..")
)
paths = st.lists(segments, min_size=1, max_size=4).map("/".join)
"""Relative slide paths as scanners and centers write them (spaces, brackets, dots)."""

hostile_text = st.text(
    alphabet=st.sampled_from(list("./\\\x00\n\r\t_-: é~%\u202e") + list(string.ascii_letters[:4]))
    | st.characters(exclude_categories=["Cs"]),
    max_size=80,
)
"""Text built mostly of the characters that climb, nest, hide or end a key early (lone
surrogates aside: no JSON document can carry them, so they are junk of their own)."""


def _json(leaves: st.SearchStrategy) -> st.SearchStrategy:
    return st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)  # JSON has neither
        | leaves,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(leaves, inner, max_size=4),
        max_leaves=12,
    )


json_values = _json(hostile_text | ids)
"""Any JSON document."""
junk_values = _json(hostile_text | ids | st.text(max_size=10))
"""Any JSON-like value, lone surrogates included."""

slide_entries = st.builds(
    SlideEntry,
    slide_id=ids,
    path=paths,
    sha256=st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
    bytes=st.integers(1, 2**50),
    mpp=st.none() | st.floats(0.02, 99.0),
    grade=st.none() | st.sampled_from(GRADES),
)


def _manifests(max_slides: int) -> st.SearchStrategy:
    unique = (lambda s: s.slide_id, lambda s: s.path)
    return st.builds(
        Manifest,
        center=ids,
        batch=ids,
        slides=st.lists(slide_entries, min_size=1, max_size=max_slides, unique_by=unique),
    )


manifests = _manifests(5)
times = st.none() | st.floats(0, 4e9)
records = st.builds(
    BatchRecord,
    batch_id=st.builds(batch_id, ids, ids),
    center=ids,
    batch=ids,
    state=st.sampled_from(["queued", "running", "done", "failed"]),
    adapt=st.sampled_from(["none", "smartccs", "tent"]),
    submitted_at=st.floats(0, 4e9),
    started_at=times,
    finished_at=times,
    heartbeat=times,
    attempts=st.integers(0, 100),
    worker=st.none() | hostile_text,
    run_id=st.none() | ids,
    adaptation=st.none() | hostile_text,
    error=st.none() | hostile_text,
    slides=st.lists(
        st.builds(
            SlideProgress,
            slide_id=ids,
            status=st.sampled_from(["pending", *SLIDE_STATUSES]),
            error=st.none() | hostile_text,
        ),
        max_size=4,
    ),
    summary=st.dictionaries(ids, st.integers(0, 10**6), max_size=6),
)


# --- valid models round-trip ---------------------------------------------------------------


@given(manifests)
def test_a_valid_manifest_round_trips_through_its_json(m: Manifest):
    assert Manifest.loads(m.dumps()) == m
    assert Manifest.model_validate_json(m.model_dump_json()) == m
    assert Manifest.loads(m.dumps()).dumps() == m.dumps(), "canonical bytes are stable"


@given(st.builds(SubmitBatch, center=ids, batch=ids, adapt=st.none() | st.sampled_from(
    ["none", "smartccs", "tent"])))  # fmt: skip
def test_a_valid_submission_round_trips_through_its_json(body: SubmitBatch):
    assert SubmitBatch.model_validate_json(body.model_dump_json()) == body
    assert SubmitBatch.model_validate(json.loads(body.model_dump_json())) == body


@given(records)
def test_a_batch_record_round_trips_through_its_json(record: BatchRecord):
    assert BatchRecord.model_validate_json(record.model_dump_json()) == record
    assert is_batch_id(record.batch_id)


# --- junk is refused with a validation error, and nothing else -----------------------------


@pytest.mark.hostile
@given(junk_values)
@example({"\n": None})  # a field name from the document must not break the message's line
def test_junk_json_is_only_ever_a_validation_error(doc):
    text = json.dumps(doc)
    for model in (Manifest, SlideEntry, SubmitBatch, BatchRecord):
        for parse in (model.model_validate, model.model_validate_json):
            with contextlib.suppress(ValidationError):
                parse(doc if parse is model.model_validate else text)
    try:
        Manifest.loads(text, "junk.json")
    except ManifestError as exc:
        assert str(exc).startswith("junk.json: ") and "\n" not in str(exc)


@pytest.mark.hostile
@given(st.binary(max_size=200) | hostile_text.map(str.encode))
def test_junk_bytes_are_only_ever_a_validation_error(data: bytes):
    with pytest.raises(ManifestError, match=r"^junk\.json: "):
        Manifest.loads(data, "junk.json")
    with pytest.raises(ValidationError):
        SubmitBatch.model_validate_json(data)


@pytest.mark.hostile
@given(
    _manifests(2),
    st.integers(0, 1),
    st.sampled_from(["slide_id", "path", "sha256", "bytes", "mpp", "grade", "extra"]),
    json_values,
)
def test_a_manifest_with_one_field_spoiled_names_that_field(
    m: Manifest, index: int, field: str, junk
):
    """Replace one slide's field with anything: it is accepted (junk that happens to be
    valid) or refused naming ``slides.<i>.<field>`` (or the duplicate it made)."""
    doc = m.model_dump(mode="json")
    i = index % len(doc["slides"])
    doc["slides"][i][field] = junk
    try:
        parsed = Manifest.loads(json.dumps(doc), "m.json")
    except ManifestError as exc:
        message = str(exc)
        assert f"slides.{i}.{field}: " in message or "duplicate" in message, message
    else:
        assert field != "extra", "unknown fields are never accepted"
        assert parsed.slides[i].model_dump(mode="json")[field] == junk


# --- what validates stays inside its prefix ------------------------------------------------


def _inside(store: Store, key: str, prefix: str) -> bool:
    """Whether ``key`` names a file under ``prefix`` of a local store once the OS resolves it."""
    root = Path(store.path(prefix)).resolve()
    target = Path(store.path(key)).resolve()
    return target.is_relative_to(root) and target != root


@pytest.mark.hostile
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hostile_text | ids, hostile_text | ids)
@example("c1\n", "b1")  # `$` in a regex matches before a trailing newline
@example("..", "b1")
def test_ids_that_validate_never_leave_their_prefix(tmp_path: Path, center: str, batch: str):
    try:
        validate_id(center)
        validate_id(batch)
    except InvalidIdError:
        with pytest.raises(InvalidIdError):
            layout.incoming(center, batch)
        return
    for value in (center, batch):
        assert value.isprintable() and value.isascii()
        assert not set(value) & set("/\\\x00") and value not in (".", "..")
        assert not value.startswith((".", "_"))
    key = layout.incoming(center, batch)
    assert key.split("/") == ["incoming", center, batch]
    assert posixpath.normpath(key) == key
    store = Store(StoreConfig(uri=str(tmp_path / "store")))
    assert _inside(store, key, "incoming")
    results = layout.results("slides", center, batch)
    assert results.split("/") == ["results", "slides", f"center={center}", f"batch={batch}"]
    assert _inside(store, results, "results/slides")


@pytest.mark.hostile
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hostile_text | paths)
@example("a\x00.svs")
@example("scan\u202egvs.svs")  # a right-to-left override disguises the extension
def test_slide_paths_that_validate_never_leave_their_batch(tmp_path: Path, path: str):
    try:
        entry = SlideEntry(slide_id="s1", path=path, sha256="0" * 64, bytes=1)
    except ValidationError as exc:
        assert [e["loc"] for e in exc.errors()] == [("path",)]
        return
    prefix = layout.incoming("c1", "b1")
    key = f"{prefix}/{entry.path}"
    assert path.isprintable() and "\\" not in path and "\x00" not in path
    assert posixpath.normpath(key) == key, "no '.', '..' or empty segment to fold"
    assert not any(part.startswith((".", "_")) for part in path.split("/"))
    store = Store(StoreConfig(uri=str(tmp_path / "store")))
    assert _inside(store, key, prefix)


@pytest.mark.hostile
@given(hostile_text | st.builds(batch_id, ids, ids) | hostile_text.map(lambda s: "b-" + s))
def test_only_batch_ids_the_service_makes_become_store_keys(value: str):
    """A URL's batch id is looked up in the store only if it has the form ``batch_id`` gives,
    which keeps the record's key one plain segment under the queue's prefix."""
    if not is_batch_id(value):
        assert BatchQueue(Store(StoreConfig(uri="/nonexistent"))).find(value) is None
        return
    key = f"{QUEUE_PREFIX}/{value}.json"
    assert posixpath.normpath(key) == key and key.count("/") == QUEUE_PREFIX.count("/") + 1
    assert value.isascii() and value.isprintable() and value.startswith("b-")
