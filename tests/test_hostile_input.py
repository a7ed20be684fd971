"""Hostile input where the platform meets it: slide files at open, inspect and upload; manifests
and ids at upload and commit; and a screening run of a batch that mixes broken and good slides.

Each broken input must give one clear line naming the file or field, at the door it came in
by, and must never sink the rest of its batch: at screening every slide of the batch still
gets exactly one row in the ``slides`` table, a broken one as ``failed`` with its reason.

Real parts: OpenSlide on real files (tiny synthetic pyramids, hand-made TIFF bombs), the store
on disk and on moto's HTTP S3 server, the shared local Ray running the screening engine with
tiny real model artifacts (tests/toy_models.py).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from moto_buckets import new_s3_store
from PIL import Image
from slide_factory import corrupt_jpeg_tile, tiff_bomb, write_disc_slide

from smartccs import layout
from smartccs.batches import BatchRef, commit_batch, load_batch
from smartccs.checksums import sha256_file
from smartccs.errors import InvalidIdError, ManifestError, SlideError
from smartccs.manifest import Manifest, SlideEntry
from smartccs.results.tables import read_table
from smartccs.slide.inspect import inspect_slide
from smartccs.slide.reader import open_slide
from smartccs.slide.tiling import plan_tiles
from smartccs.store import Store, StoreConfig
from smartccs.upload import UploadError, upload_batch

sys.path.insert(0, str(Path(__file__).parent))
from toy_models import TOY_TILING, save_toy_models, toy_screening

pytestmark = pytest.mark.hostile

SENTINEL = "PATIENT-DOE-1234"
"""Stands for patient metadata: written into file names and TIFF ImageDescriptions, it must
never reach a log."""

SHA = "0" * 64


# --- the catalogue of broken slide files ---------------------------------------------------


def _zero(p: Path) -> Path:
    p.write_bytes(b"")
    return p


def _truncated(p: Path) -> Path:
    good = write_disc_slide(p.with_name("whole-" + p.name), size_px=1024)
    data = good.read_bytes()
    p.write_bytes(data[: len(data) // 3])
    good.unlink()
    return p


def _png(p: Path) -> Path:
    Image.new("RGB", (64, 64), "white").save(p, format="PNG")
    return p


def _text(p: Path) -> Path:
    p.write_text(f"referral letter for {SENTINEL}\n")
    return p


def _no_mpp(p: Path) -> Path:
    return write_disc_slide(p, fmt="svs", mpp=None, size_px=512)


# name -> (file name, maker, what the one-line error says)
BROKEN: dict[str, tuple[str, Callable[[Path], Path], str]] = {
    "zero-byte": ("zero.svs", _zero, "empty file (0 bytes)"),
    "truncated": ("truncated.svs", _truncated, "a TIFF that OpenSlide cannot open"),
    "tiff-bomb": ("bomb.tiff", lambda p: tiff_bomb(p, 600_000), "declares 600000x600000 px"),
    "flat-bomb": ("flat.tiff", lambda p: tiff_bomb(p, 40_000), "no level smaller than 40000x"),
    "huge-tiles": ("tiles.tiff", lambda p: tiff_bomb(p, 9000, 8704), "tiles of 8704x8704 px"),
    "png-as-svs": ("photo.svs", _png, "looks like a PNG image, not a whole-slide image"),
    "text-as-svs": ("notes.svs", _text, "not a whole-slide image format OpenSlide can read"),
    "no-mpp": ("nompp.svs", _no_mpp, "no microns-per-pixel in the file"),
}


def one_line(message: str, name: str) -> str:
    assert "\n" not in message and "Traceback" not in message, message
    assert message.startswith(f"{name}: "), message
    return message


# --- slide files at open, inspect and upload -----------------------------------------------


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_slide_is_one_line_naming_it_at_open_and_inspect(tmp_path: Path, kind: str):
    filename, make, reason = BROKEN[kind]
    path = make(tmp_path / filename)
    assert path.stat().st_size < 2_000_000  # bombs declare gigapixels in kilobytes
    with pytest.raises(SlideError) as exc:
        open_slide(path)
    assert reason in one_line(str(exc.value), filename)
    with pytest.raises(SlideError) as exc:  # `ccs inspect`
        inspect_slide(str(path))
    assert reason in one_line(str(exc.value), filename)


def test_upload_names_every_broken_file_and_writes_nothing(tmp_path: Path, any_store: Store):
    folder = tmp_path / "scans"
    folder.mkdir()
    write_disc_slide(folder / "good.svs", size_px=1024)
    for filename, make, _ in BROKEN.values():
        make(folder / filename)
    with pytest.raises(UploadError) as exc:
        upload_batch(folder, center="c1", batch="b1", store=any_store, progress=False)
    lines = str(exc.value).splitlines()
    assert lines[0] == f"{len(BROKEN)} problem(s) in {folder}, nothing uploaded:"
    for filename, _, reason in BROKEN.values():
        [line] = [x for x in lines if x.startswith(f"{filename}: ")]
        assert reason in line, line
    assert not any(x.startswith("good.svs") for x in lines)
    assert any_store.list("incoming") == []


def test_a_corrupt_tile_fails_its_reads_only(tmp_path: Path):
    """A corrupt tile inside a valid pyramid fails the read of that tile in one line (upload
    decodes only the mask level and one tile per level, test_hostile_upload.py), and reads
    elsewhere on the same (cached) handle still work: OpenSlide's errors are sticky, so the
    reader reopens the slide after a failed read."""
    good = write_disc_slide(tmp_path / "good.svs", size_px=4096)
    path = corrupt_jpeg_tile(good, tmp_path / "corrupt.svs", page=2, tile=5)
    with open_slide(path) as slide:
        assert slide.info.level_dimensions[2] == (1024, 1024)  # 4 x 4 tiles of 256 px
        with pytest.raises(SlideError) as exc:
            slide.read_rgb(2, 1024, 1024, 256, 256)  # level-2 tile 5: column 1, row 1
        message = one_line(str(exc.value), "corrupt.svs")
        assert "cannot read level 2 region at (1024, 1024) size 256x256" in message
        for x, y in [(0, 0), (2048, 2048), (3072, 0)]:
            assert slide.read_rgb(2, x, y, 256, 256).shape == (256, 256, 3)
        with pytest.raises(SlideError):  # the corrupt tile itself stays unreadable
            slide.read_rgb(2, 1024, 1024, 256, 256)


def test_the_extension_does_not_decide_what_a_file_is(tmp_path: Path, local_store: Store):
    """OpenSlide sniffs content: a real slide named .jpg is accepted as the slide it is, and
    a PNG named .svs is refused as the PNG it is (test above)."""
    folder = tmp_path / "scans"
    folder.mkdir()
    write_disc_slide(folder / "scan.jpg", size_px=1024)
    ref = upload_batch(folder, center="c1", batch="b1", store=local_store, progress=False)
    assert [(s.slide_id, s.path) for s in ref.manifest.slides] == [("scan", "scan.jpg")]
    with open_slide(folder / "scan.jpg") as slide:
        assert slide.info.vendor == "aperio"


# --- manifests and ids ---------------------------------------------------------------------


def _entry(**kw: object) -> dict:
    return {"slide_id": "s1", "path": "s1.svs", "sha256": SHA, "bytes": 10} | kw


def _manifest(**kw: object) -> str:
    return json.dumps({"center": "c1", "batch": "b1", "slides": [_entry()]} | kw)


TRAVERSING_IDS = ["../x", "..", "/abs", "a/b", "a\x00b", "a\\b", "c1\n", ".hidden", "_x", "é"]
TRAVERSING_PATHS = [
    "../x.svs",
    "a/../../x.svs",
    "/etc/passwd",
    "a\\..\\x.svs",
    "a\x00.svs",
    "x.svs\n",
    "a//x.svs",
    "./x.svs",
    "_COMMITTED",
    ".hidden/x.svs",
]


@pytest.mark.parametrize("bad", TRAVERSING_IDS)
@pytest.mark.parametrize("field", ["center", "batch", "slide_id"])
def test_ids_that_could_leave_their_prefix_are_named_and_refused(bad: str, field: str):
    if field == "slide_id":
        doc, where = _manifest(slides=[_entry(slide_id=bad)]), "slides.0.slide_id"
    else:
        doc, where = _manifest(**{field: bad}), field
    with pytest.raises(ManifestError) as exc:
        Manifest.loads(doc, "in/manifest.json")
    assert str(exc.value).startswith(f"in/manifest.json: {where}: invalid "), str(exc.value)
    with pytest.raises(InvalidIdError):
        layout.incoming(bad, "b1")
    with pytest.raises(InvalidIdError):
        layout.results("slides", "c1", bad)


@pytest.mark.parametrize("bad", TRAVERSING_PATHS)
def test_slide_paths_that_could_leave_the_batch_are_named_and_refused(bad: str):
    with pytest.raises(ManifestError) as exc:
        Manifest.loads(_manifest(slides=[_entry(path=bad)]), "in/manifest.json")
    assert str(exc.value).startswith("in/manifest.json: slides.0.path: path "), str(exc.value)


@pytest.mark.parametrize("center", ["../evil", "/abs", "c1\n", "a\x00"])
def test_upload_refuses_a_bad_center_before_any_io(tmp_path: Path, center: str):
    store = Store(StoreConfig(uri=str(tmp_path / "store")))
    with pytest.raises(InvalidIdError, match="invalid center"):
        upload_batch(tmp_path / "nowhere", center=center, batch="b1", store=store)
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    ("doc", "named"),
    [
        (_manifest(surprise=1), "surprise: Extra inputs are not permitted"),
        (_manifest(slides=[_entry(patient="Doe")]), "slides.0.patient: Extra inputs"),
        (_manifest(slides=[_entry(), _entry(path="x.svs")]), "duplicate slide_id 's1'"),
        (_manifest(slides=[_entry(), _entry(slide_id="s2")]), "duplicate path 's1.svs'"),
        (_manifest(slides=[_entry(sha256="F" * 64)]), "slides.0.sha256: String should match"),
        (_manifest(slides=[_entry(bytes=-1)]), "slides.0.bytes"),
        (_manifest(slides=[_entry(mpp=float("nan"))]), "slides.0.mpp"),
        (_manifest(schema_version=99), "schema_version"),
        (_manifest(**{"x\nERROR forged": 1}), "'x\\nERROR forged': Extra inputs"),
        ('{"center": "c1"', "Invalid JSON"),
        ("[]", "Input should be an object"),
        ("null", "Input should be an object"),
        ("\x00\xff", "Invalid JSON"),
        ("[" * 10_000 + "]" * 10_000, "(root)"),
    ],
)
def test_bad_manifests_are_one_manifest_error_naming_source_and_field(doc: str, named: str):
    with pytest.raises(ManifestError) as exc:
        Manifest.loads(doc, "in/manifest.json")
    message = str(exc.value)
    assert message.startswith("in/manifest.json: ") and named in message, message
    assert "\n" not in message


def test_wrong_checksums_and_sizes_are_caught_at_upload_and_at_commit(
    tmp_path: Path, any_store: Store
):
    folder = tmp_path / "scans"
    folder.mkdir()
    path = write_disc_slide(folder / "s1.svs", size_px=1024)
    entry = {"slide_id": "s1", "path": "s1.svs", "sha256": "f" * 64, "bytes": 1}
    (folder / "manifest.json").write_text(
        json.dumps({"center": "c", "batch": "b", "slides": [entry]})
    )
    with pytest.raises(UploadError) as exc:  # `ccs upload` hashes before it sends a byte
        upload_batch(folder, center="c1", batch="b1", store=any_store, progress=False)
    assert "s1.svs: sha256 does not match manifest.json" in str(exc.value)
    assert any_store.list("incoming") == []

    # any S3 client: the objects are put in place, then committed against the manifest
    prefix = layout.incoming("c1", "b1")
    any_store.put_file(path, f"{prefix}/s1.svs")
    size = path.stat().st_size
    lying = SlideEntry(slide_id="s1", path="s1.svs", sha256="f" * 64, bytes=size + 1)
    with pytest.raises(ManifestError, match=rf"s1.svs: {size} bytes in the store, manifest says"):
        commit_batch(any_store, Manifest(center="c1", batch="b1", slides=[lying]))
    wrong_sum = lying.model_copy(update={"bytes": size})
    with pytest.raises(ManifestError, match="s1.svs: sha256 in the store differs"):
        commit_batch(
            any_store,
            Manifest(center="c1", batch="b1", slides=[wrong_sum]),
            verify_checksums=True,
        )
    assert not any_store.exists(prefix, layout.COMMIT_MARKER)


def test_duplicate_slide_ids_in_a_folder_are_named_at_upload(tmp_path: Path, local_store: Store):
    folder = tmp_path / "scans"
    folder.mkdir()
    write_disc_slide(folder / "s1.svs", size_px=512)
    write_disc_slide(folder / "s1.tiff", fmt="tiff", size_px=512)
    with pytest.raises(UploadError, match="slide id 's1' is used by more than one file"):
        upload_batch(folder, center="c1", batch="b1", store=local_store, progress=False)
    assert local_store.list("incoming") == []


# --- a screening run of a batch that mixes broken and good slides --------------------------


class _Records(logging.Handler):
    """The test process's log records as the platform logs them at its most verbose
    (``configure_logging(2)``: smartccs at DEBUG, third parties at WARNING), formatted with
    any traceback. The moto server's request log is left out: it stands for S3's own access
    logs, on the other side of the wire."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith(("werkzeug", "moto")):
            self.lines.append(self.format(record))


CORRUPT_PAGE, CORRUPT_TILE = 2, 4
"""Level 2 of the 4096 px slide is 4 x 4 JPEG tiles of 256 px; tile 4 (column 0, row 1) holds
the cell at (205, 307) µm, on the first tile the toy tiling (128 µm read from level 2) plans,
so every other planned tile of the slide is read after the failure."""


def _failing_tiles(good: Path) -> tuple[int, int]:
    """(planned tiles, planned tiles that touch the corrupt JPEG tile) of the good slide."""
    col, row = CORRUPT_TILE % 4, CORRUPT_TILE // 4
    x0, y0, side = col * 1024, row * 1024, 1024  # the JPEG tile in level-0 px
    with open_slide(good) as slide:
        plan = plan_tiles(slide, TOY_TILING)
    touching = [
        t
        for t in plan.tiles
        if t.level == CORRUPT_PAGE
        and t.x0 < x0 + side
        and x0 < t.x0 + t.w0
        and t.y0 < y0 + side
        and y0 < t.y0 + t.h0
    ]
    return len(plan.tiles), len(touching)


@pytest.fixture(scope="module")
def screened(
    s3_endpoint: str, ray_session: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict]:
    """Two batches on the moto S3 store, screened in one run with the toy models.

    ``hostile/b1`` is put in place the way a center's own S3 client can (objects, then a
    commit marker it writes itself: ``commit_batch`` without its checksum check): good
    slides, the broken catalogue (less the zero-byte file, which no manifest can declare), a
    corrupt JPEG tile, a wrong checksum and an object emptied after its commit.
    ``private/b1`` goes through ``upload_batch`` with a slide whose file name and
    ImageDescription carry ``SENTINEL``. The test process's log records (DEBUG and up) are
    collected while it runs.
    """
    tmp = tmp_path_factory.mktemp("hostile-screen")
    store = new_s3_store(s3_endpoint, "hostile")
    save_toy_models(store)
    src = tmp / "src"
    src.mkdir()
    files: dict[str, Path] = {
        "good": write_disc_slide(src / "good.svs", size_px=1024),
        "renamed": write_disc_slide(src / "renamed.jpg", size_px=1024),
    }
    for kind, (filename, make, _) in BROKEN.items():
        if kind != "zero-byte":
            files[kind] = make(src / filename)
    # tags carry the sentinel, file names in the store do not: their errors must not leak it
    big = write_disc_slide(src / f"{SENTINEL}.svs", size_px=4096)
    files["corrupt"] = corrupt_jpeg_tile(big, src / "corrupt.svs", CORRUPT_PAGE, CORRUPT_TILE)
    files["no-mpp"] = _no_mpp(src / f"{SENTINEL}-nompp.svs")
    files["wrong-sum"] = write_disc_slide(src / "wrongsum.svs", size_px=1024)
    files["emptied"] = write_disc_slide(src / "emptied.svs", size_px=1024)
    prefix = layout.incoming("hostile", "b1")
    entries = []
    for kind, path in files.items():
        rel = f"{kind}{path.suffix}"
        store.put_file(path, f"{prefix}/{rel}")
        digest = "f" * 64 if kind == "wrong-sum" else sha256_file(path)
        entries.append(
            SlideEntry(slide_id=kind, path=rel, sha256=digest, bytes=path.stat().st_size)
        )
    commit_batch(
        store, Manifest(center="hostile", batch="b1", slides=entries), verify_checksums=False
    )
    store.write_bytes(f"{prefix}/emptied.svs", b"")  # replaced after the commit

    private = tmp / "private"
    private.mkdir()
    secret = write_disc_slide(private / f"{SENTINEL}.svs", size_px=1024)
    assert SENTINEL.encode() in secret.read_bytes()  # the Aperio description names the file
    manifest = {
        "center": "private",
        "batch": "b1",
        "slides": [
            {
                "slide_id": "s-0001",
                "path": secret.name,
                "sha256": sha256_file(secret),
                "bytes": secret.stat().st_size,
            }
        ],
    }
    (private / "manifest.json").write_text(json.dumps(manifest))

    records = _Records()
    root, ours = logging.getLogger(), logging.getLogger("smartccs")
    old_level = ours.level
    root.addHandler(records)
    ours.setLevel(logging.DEBUG)
    try:
        from smartccs.engine.screen import screen_batches

        upload_batch(private, center="private", batch="b1", store=store, progress=False)
        refs: list[BatchRef] = [load_batch(store, c, "b1") for c in ("hostile", "private")]
        outcomes = screen_batches(store, refs, toy_screening(tmp), run_id="hostile")
    finally:
        root.removeHandler(records)
        ours.setLevel(old_level)
    yield {
        "store": store,
        "refs": refs,
        "outcomes": outcomes,
        "logs": records.lines,
        "expected_failed_tiles": _failing_tiles(big),
    }


SCREEN_REASONS = {
    "truncated": "a TIFF that OpenSlide cannot open",
    "tiff-bomb": "declares 600000x600000 px",
    "flat-bomb": "no level smaller than 40000x40000 px",
    "huge-tiles": "tiles of 8704x8704 px",
    "png-as-svs": "looks like a PNG image",
    "text-as-svs": "not a whole-slide image format",
    "no-mpp": "no microns-per-pixel in the file",
    "wrong-sum": "sha256 mismatch: the manifest says ffffffffffff...",
    "emptied": "0 bytes in the store, the manifest says",
}


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.slow
def test_a_mixed_batch_gives_one_row_per_slide_and_each_broken_one_its_reason(screened):
    store, (hostile, _) = screened["store"], screened["refs"]
    rows = read_table(store, "slides", centers=["hostile"], batches=["b1"]).to_pylist()
    ids = [r["slide_id"] for r in rows]
    assert sorted(ids) == sorted(s.slide_id for s in hostile.manifest.slides), "one row each"
    by_id = {r["slide_id"]: r for r in rows}
    for kind, reason in SCREEN_REASONS.items():
        row = by_id[kind]
        key = hostile.slide_key(hostile.manifest.slide(kind).path)
        assert row["status"] == "failed", row
        assert key in row["error"], row["error"]  # the file, as the store names it
        assert reason in row["error"] and "\n" not in row["error"], row["error"]
        assert row["score"] is None and row["positive"] is None and row["n_cells"] == 0
    for kind in ("good", "renamed"):
        row = by_id[kind]
        assert row["status"] != "failed" and row["score"] is not None, row
        assert row["tiles_failed"] == 0 and row["tiles_read"] == row["n_tiles"] > 0
    [outcome] = [o for o in screened["outcomes"] if o.center == "hostile"]
    assert outcome.slides == len(rows) and outcome.failed == len(SCREEN_REASONS)
    cells = read_table(store, "cells", centers=["hostile"], batches=["b1"]).to_pylist()
    assert not {c["slide_id"] for c in cells} & set(SCREEN_REASONS), "no cells from failed slides"


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.slow
def test_a_corrupt_tile_costs_its_own_tiles_not_the_slide(screened):
    planned, touching = screened["expected_failed_tiles"]
    assert 0 < touching < planned
    store = screened["store"]
    rows = read_table(store, "slides", centers=["hostile"], batches=["b1"]).to_pylist()
    [row] = [r for r in rows if r["slide_id"] == "corrupt"]
    assert row["status"] != "failed" and row["score"] is not None, row
    assert (row["n_tiles"], row["tiles_failed"]) == (planned, touching), row
    assert row["tiles_read"] == planned - touching
    assert row["error"].startswith(f"{touching} of {planned} tiles failed: "), row["error"]
    assert "incoming/hostile/b1/corrupt.svs: cannot read level 2 region" in row["error"]


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.slow
def test_no_patient_metadata_or_file_name_reaches_the_logs(screened, ray_session: str):
    """The sentinel is in a good slide's file name and ImageDescription (uploaded with a
    manifest that gives it a neutral id) and in broken slides' ImageDescriptions: neither the
    test process's log records (DEBUG and up) nor any log file of the Ray session carry it."""
    import ray._private.worker as ray_worker

    store = screened["store"]
    rows = read_table(store, "slides", centers=["private"], batches=["b1"]).to_pylist()
    assert [(r["slide_id"], r["status"] != "failed") for r in rows] == [("s-0001", True)]
    lines = screened["logs"]
    assert any(x.startswith("smartccs.upload DEBUG slide s-0001: aperio") for x in lines), lines
    leaks = [line for line in lines if SENTINEL in line]
    assert not leaks, leaks
    logs_dir = Path(ray_worker._global_node.get_logs_dir_path())
    contents = {p: p.read_bytes() for p in logs_dir.rglob("*") if p.is_file()}
    # the planners' warnings about the broken slides are there: the workers' logs are read
    assert any(b"slide hostile/b1/truncated: " in data for data in contents.values())
    leaked = [str(p) for p, data in contents.items() if SENTINEL.encode() in data]
    assert not leaked, leaked
    slides = read_table(store, "slides").to_pylist()
    assert not [r for r in slides if SENTINEL in json.dumps(r, default=str)], "nor the tables"
