"""``ccs upload``: a folder becomes one committed batch, or nothing at all."""

import hashlib
import json
from pathlib import Path

import pytest
from cli import assert_one_line_error, run_ccs
from slide_factory import write_disc_slide

from smartccs import layout
from smartccs.batches import list_batches, load_batch
from smartccs.errors import AlreadyCommittedError
from smartccs.manifest import Manifest
from smartccs.store import Store
from smartccs.upload import UploadError, upload_batch


@pytest.fixture
def slide_dir(tmp_path: Path) -> Path:
    d = tmp_path / "scans"
    d.mkdir()
    write_disc_slide(d / "s1.svs", fmt="svs", mpp=0.25)
    write_disc_slide(d / "s2.tiff", fmt="tiff", mpp=0.5)
    return d


def test_valid_folder_is_committed_with_checksums_and_sizes(slide_dir: Path, any_store: Store):
    ref = upload_batch(slide_dir, center="c1", batch="b1", store=any_store, progress=False)
    assert [s.slide_id for s in ref.manifest.slides] == ["s1", "s2"]
    assert list_batches(any_store) == [("c1", "b1")]
    loaded = load_batch(any_store, "c1", "b1").manifest
    for s in loaded.slides:
        data = any_store.read_bytes(layout.incoming("c1", "b1"), s.path)
        assert hashlib.sha256(data).hexdigest() == s.sha256
        assert len(data) == s.bytes == (slide_dir / s.path).stat().st_size


def test_one_bad_file_uploads_nothing_and_names_every_problem(slide_dir, any_store):
    (slide_dir / "empty.svs").write_bytes(b"")
    (slide_dir / "notes.svs").write_text("this is not a slide")
    write_disc_slide(slide_dir / "nompp.tiff", fmt="tiff", mpp=None)
    with pytest.raises(UploadError) as info:
        upload_batch(slide_dir, center="c1", batch="b1", store=any_store, progress=False)
    message = str(info.value)
    assert "3 problem(s)" in message
    for name in ("empty.svs", "notes.svs", "nompp.tiff"):
        assert any(line.startswith(name) for line in message.splitlines()), (name, message)
    assert any_store.list("incoming") == []


def test_committed_batch_is_never_overwritten(slide_dir, any_store):
    upload_batch(slide_dir, center="c1", batch="b1", store=any_store, progress=False)
    with pytest.raises(AlreadyCommittedError):
        upload_batch(slide_dir, center="c1", batch="b1", store=any_store, progress=False)


def test_manifest_in_folder_supplies_ids_and_grades_and_is_verified(slide_dir, local_store):
    files = {"a-1": "s1.svs", "a-2": "s2.tiff"}
    slides = [
        {
            "slide_id": sid,
            "path": rel,
            "sha256": hashlib.sha256((slide_dir / rel).read_bytes()).hexdigest(),
            "bytes": (slide_dir / rel).stat().st_size,
            "grade": "HSIL",
        }
        for sid, rel in files.items()
    ]
    doc = {"center": "any", "batch": "any", "slides": slides}
    (slide_dir / "manifest.json").write_text(json.dumps(doc))
    ref = upload_batch(slide_dir, center="c9", batch="b9", store=local_store, progress=False)
    assert ref.manifest.center == "c9"
    assert [s.slide_id for s in ref.manifest.slides] == ["a-1", "a-2"]
    assert {s.grade for s in ref.manifest.slides} == {"HSIL"}

    slides[0]["sha256"] = "f" * 64
    (slide_dir / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(UploadError, match="s1.svs: sha256 does not match"):
        upload_batch(slide_dir, center="c9", batch="b10", store=local_store, progress=False)


def test_manifest_mpp_override_admits_a_slide_without_mpp(tmp_path, local_store):
    d = tmp_path / "scans"
    d.mkdir()
    path = write_disc_slide(d / "x.tiff", fmt="tiff", mpp=None)
    m = {
        "center": "c",
        "batch": "b",
        "slides": [
            {
                "slide_id": "x",
                "path": "x.tiff",
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                "bytes": path.stat().st_size,
                "mpp": 0.25,
            }
        ],
    }
    (d / "manifest.json").write_text(json.dumps(m))
    ref = upload_batch(d, center="c", batch="b", store=local_store, progress=False)
    assert ref.manifest.slides[0].mpp == 0.25


def test_objects_left_by_a_crashed_upload_are_replaced(slide_dir, any_store):
    prefix = layout.incoming("c1", "b1")
    any_store.write_bytes(f"{prefix}/leftover.bin", b"half an upload")
    upload_batch(slide_dir, center="c1", batch="b1", store=any_store, progress=False)
    keys = any_store.list(prefix)
    assert f"{prefix}/leftover.bin" not in keys
    assert sorted(k.rsplit("/", 1)[-1] for k in keys) == [
        "_COMMITTED",
        "manifest.json",
        "s1.svs",
        "s2.tiff",
    ]


@pytest.mark.parametrize("center", ["../evil", "a/b", ".hidden"])
def test_path_traversal_in_ids_is_refused_before_any_io(slide_dir, local_store, center):
    with pytest.raises(ValueError, match="invalid center"):
        upload_batch(slide_dir, center=center, batch="b1", store=local_store, progress=False)


def test_cli_upload_reports_bad_files_on_stderr_and_exits_non_zero(slide_dir, tmp_path):
    (slide_dir / "broken.svs").write_bytes(b"II*\x00garbage")
    store = tmp_path / "store"
    res = run_ccs(
        "upload", str(slide_dir), "--center", "c1", "--batch", "b1", "--store", str(store)
    )
    assert res.returncode == 1
    assert_one_line_error(res, "1 problem(s)", "broken.svs")
    assert not (store / "incoming").exists() or not any((store / "incoming").rglob("*.svs"))


def test_cli_upload_commits_and_says_where(slide_dir, tmp_path):
    store = tmp_path / "store"
    res = run_ccs(
        "upload", str(slide_dir), "--center", "c1", "--batch", "b1", "--store", str(store)
    )
    assert res.returncode == 0, res.stderr
    assert "committed 2 slides" in res.stdout
    assert Manifest.loads((store / "incoming/c1/b1/manifest.json").read_bytes()).batch == "b1"


def _manifest_for(folder: Path, center: str, batch: str) -> Path:
    """A manifest.json in ``folder`` for the slides it holds, naming ``center`` and ``batch``."""
    slides = [
        {
            "slide_id": p.name.split(".")[0],
            "path": p.name,
            "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
            "bytes": p.stat().st_size,
        }
        for p in sorted(folder.iterdir())
    ]
    path = folder / "manifest.json"
    path.write_text(json.dumps({"center": center, "batch": batch, "slides": slides}))
    return path


def test_cli_upload_refuses_a_folder_whose_manifest_names_another_center(slide_dir, tmp_path):
    manifest = _manifest_for(slide_dir, "hospital-b", "2026-11-21")
    store = tmp_path / "store"
    says = (
        f"{manifest} says center 'hospital-b', but this upload is for center 'hospital-a'; "
        "nothing uploaded: correct --center or the manifest"
    )
    for batch in ("2026-11-21", "b2"):
        res = run_ccs("upload", str(slide_dir), "--center", "hospital-a", "--batch", batch,
                      "--store", str(store))  # fmt: skip
        assert res.returncode == 1
        assert_one_line_error(res, says)
        assert len(res.stderr.splitlines()) == 1, res.stderr
        assert not store.exists(), sorted(store.rglob("*"))  # nothing written

    # --batch names this upload of the folder: another batch id than the manifest's is fine
    ok = ("--center", "hospital-b", "--batch", "b2", "--store", str(store))
    res = run_ccs("upload", str(slide_dir), *ok)
    assert res.returncode == 0, res.stderr
    assert list_batches(Store(str(store))) == [("hospital-b", "b2")]


def test_cli_labels_publishes_annotations_and_names_a_bad_row(slide_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = tmp_path / "store"
    args = ("--center", "c1", "--batch", "b1", "--store", str(store))
    assert run_ccs("upload", str(slide_dir), *args).returncode == 0
    slide_id = Manifest.loads((store / "incoming/c1/b1/manifest.json").read_bytes()).slides[0]
    good, bad = tmp_path / "cells.parquet", tmp_path / "bad.parquet"
    row = {"slide_id": [slide_id.slide_id], "class": ["HSIL"], "x0": [10], "y0": [10]}
    pq.write_table(pa.table(row | {"x1": [30], "y1": [30]}), good)
    pq.write_table(pa.table(row | {"x1": [10], "y1": [30]}), bad)
    res = run_ccs("labels", str(good), *args)
    assert res.returncode == 0, res.stderr
    assert (store / "labels/c1/b1/cells.parquet").is_file()
    assert_one_line_error(run_ccs("labels", str(bad), *args), "row 0: empty box")
