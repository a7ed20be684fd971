"""The manifest contract: strict, canonical, and errors that name the field."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smartccs import layout
from smartccs.errors import InvalidIdError, ManifestError
from smartccs.ids import validate_id
from smartccs.manifest import Manifest, SlideEntry
from smartccs.taxonomy import GRADES, slide_grade

SHA = "0" * 64


def entry(**kw) -> dict:
    return {"slide_id": "s1", "path": "slides/s1.svs", "sha256": SHA, "bytes": 10} | kw


def manifest_json(**kw) -> str:
    return json.dumps({"center": "c1", "batch": "b1", "slides": [entry()]} | kw)


def test_valid_manifest_round_trips_through_canonical_bytes():
    m = Manifest.loads(manifest_json())
    assert Manifest.loads(m.dumps()) == m
    assert m.dumps() == Manifest.loads(m.dumps()).dumps()


@pytest.mark.parametrize(
    ("slides", "field"),
    [
        ([entry(sha256="abc")], "slides.0.sha256"),
        ([entry(bytes=0)], "slides.0.bytes"),
        ([entry(path="../etc/passwd")], "slides.0.path"),
        ([entry(path="/abs.svs")], "slides.0.path"),
        ([entry(slide_id="a/b")], "slides.0.slide_id"),
        ([entry(mpp=-1)], "slides.0.mpp"),
        ([entry(grade="CIN3")], "slides.0.grade"),
        ([entry(extra=1)], "slides.0.extra"),
        ([], "slides"),
    ],
)
def test_invalid_fields_are_named_in_the_error(slides, field):
    with pytest.raises(ManifestError, match=rf"in/manifest.json: .*{field}"):
        Manifest.loads(manifest_json(slides=slides), "in/manifest.json")


def test_duplicate_slide_ids_are_refused():
    with pytest.raises(ManifestError, match="duplicate slide_id 's1'"):
        Manifest.loads(manifest_json(slides=[entry(), entry(path="other.svs")]))


def test_unknown_top_level_fields_and_versions_are_refused():
    with pytest.raises(ManifestError, match="surprise"):
        Manifest.loads(manifest_json(surprise=True))
    with pytest.raises(ManifestError, match="schema_version"):
        Manifest.loads(manifest_json(schema_version=2))


def test_garbage_is_a_manifest_error_not_a_crash():
    with pytest.raises(ManifestError, match="x.json"):
        Manifest.loads(b"\x00not json", "x.json")


@pytest.mark.parametrize("bad", ["", "..", "a/b", ".hidden", "_marker", "a..b", "x" * 65, "é"])
def test_ids_that_could_escape_or_hide_are_refused(bad: str):
    with pytest.raises(InvalidIdError):
        validate_id(bad)
    with pytest.raises(InvalidIdError):
        layout.incoming(bad, "b1")


@given(
    st.lists(
        st.builds(
            SlideEntry,
            slide_id=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,20}", fullmatch=True),
            path=st.from_regex(r"[a-z0-9]{1,8}(/[a-z0-9]{1,8}){0,2}\.svs", fullmatch=True),
            sha256=st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
            bytes=st.integers(1, 2**40),
            mpp=st.none() | st.floats(0.05, 10),
            grade=st.none() | st.sampled_from(GRADES),
        ),
        min_size=1,
        max_size=5,
        unique_by=(lambda s: s.slide_id, lambda s: s.path),
    )
)
def test_any_valid_manifest_survives_a_round_trip(slides):
    m = Manifest(center="c1", batch="b1", slides=slides)
    assert Manifest.loads(m.dumps()) == m


def test_slide_grade_is_the_most_severe_class_present():
    assert slide_grade([]) == "NILM"
    assert slide_grade(["ASC-US", "HSIL", "LSIL"]) == "HSIL"
    assert slide_grade(["AGC", "ASC-H"]) == "AGC"
    assert slide_grade(["superficial", "SCC"]) == "SCC"
