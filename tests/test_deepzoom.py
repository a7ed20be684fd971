"""Deep Zoom of committed slides (smartccs.slide.deepzoom), for the review viewer.

Real parts: the tiny synthetic cohort uploaded into a store on disk (and into moto's S3 for the
slide cache's eviction), a generic TIFF with missing tiles so OpenSlide reports bounds, real
OpenSlide and its own ``DeepZoomGenerator`` as the reference for every pixel.
"""

from __future__ import annotations

import io
import math
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import openslide
import pytest
import tifffile
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image
from slide_factory import write_disc_slide

from smartccs import layout
from smartccs.batches import commit_batch
from smartccs.checksums import sha256_file
from smartccs.errors import CCSError
from smartccs.manifest import MANIFEST_NAME, Manifest, SlideEntry
from smartccs.slide import deepzoom
from smartccs.slide.cache import SlideCache
from smartccs.slide.deepzoom import (
    JPEG_QUALITY,
    DeepZoomSlides,
    SlideNotFound,
    SlideUnreadable,
    TileNotFound,
)
from smartccs.slide.reader import open_slide
from smartccs.store import Store, StoreConfig
from smartccs.upload import upload_batch

DZI_NS = "{http://schemas.microsoft.com/deepzoom/2008}"
SPARSE = ("lab", "b1", "sparse")
SPARSE_BOUNDS = (512, 256)
"""Level-0 tiles (256 px) of the first row and first two columns are missing from the file."""


def _sparse_slide(folder: Path) -> Path:
    """A generic TIFF whose first level-0 tile row and two columns are absent (byte count 0),
    as scanners leave unscanned glass: OpenSlide reports ``openslide.bounds-*`` for it."""
    folder.mkdir(parents=True)
    path = write_disc_slide(folder / "sparse.tiff", fmt="tiff", size_px=2048)
    with tifffile.TiffFile(path, mode="r+") as tif:
        tag = tif.pages[0].tags["TileByteCounts"]
        counts = list(tag.value)
        across = 2048 // 256
        for i in range(len(counts)):
            row, col = divmod(i, across)
            if row < 1 or col < 2:
                counts[i] = 0
        tag.overwrite(counts)
    entry = SlideEntry(slide_id="sparse", path="sparse.tiff", sha256=sha256_file(path),
                       bytes=path.stat().st_size, mpp=0.5)  # fmt: skip
    manifest = Manifest(center=SPARSE[0], batch=SPARSE[1], slides=[entry])
    (folder / MANIFEST_NAME).write_bytes(manifest.dumps())
    return path


@pytest.fixture(scope="module")
def dz_store(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Store:
    """The tiny cohort's centers as batch b1, the sparse slide as lab/b1, the first center's
    slides again uncommitted (int-a/b2), and a committed batch of one truncated slide."""
    store = Store(StoreConfig(uri=str(tmp_path_factory.mktemp("dz") / "store")))
    for d in sorted(p.parent for p in tiny_cohort.glob("*/manifest.json")):
        upload_batch(d, center=d.name, batch="b1", store=store, progress=False)
    sparse = _sparse_slide(tmp_path_factory.mktemp("sparse") / "lab")
    upload_batch(sparse.parent, center="lab", batch="b1", store=store, progress=False)
    first = tiny_cohort / "int-a"
    good = Manifest.loads((first / MANIFEST_NAME).read_bytes()).slides[0]
    store.put_file(first / good.path, f"{layout.incoming('int-a', 'b2')}/{good.path}")
    broken = tmp_path_factory.mktemp("broken") / "broken.svs"
    data = (first / good.path).read_bytes()
    broken.write_bytes(data[: len(data) // 3])
    prefix = layout.incoming("bad", "b1")
    store.put_file(broken, f"{prefix}/broken.svs")
    entry = SlideEntry(slide_id="broken", path="broken.svs", sha256=sha256_file(broken),
                       bytes=broken.stat().st_size)  # fmt: skip
    commit_batch(store, Manifest(center="bad", batch="b1", slides=[entry]))
    return store


@pytest.fixture
def slides(dz_store: Store, tmp_path: Path):
    with DeepZoomSlides(dz_store, SlideCache(tmp_path / "cache", 2**30), max_open=2) as s:
        yield s


def _file(store: Store, center: str, batch: str, slide_id: str) -> Path:
    manifest = Manifest.loads(store.read_bytes(layout.incoming(center, batch), MANIFEST_NAME))
    return Path(store.path(layout.incoming(center, batch), manifest.slide(slide_id).path))


def _cohort_slides(store: Store) -> list[tuple[str, str, str]]:
    keys = []
    for center in ("int-a", "int-b"):
        manifest = Manifest.loads(store.read_bytes(layout.incoming(center, "b1"), MANIFEST_NAME))
        keys += [(center, "b1", s.slide_id) for s in manifest.slides]
    return keys


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _generator_tile(path: Path, level: int, col: int, row: int) -> bytes:
    """OpenSlide's own Deep Zoom tile of the file, as JPEG."""
    with openslide.OpenSlide(path) as osr:
        generator = DeepZoomGenerator(osr, tile_size=254, overlap=1, limit_bounds=True)
        return _jpeg(generator.get_tile(level, (col, row)))


def _region(path: Path, x: int, y: int, w: int, h: int) -> bytes:
    """OpenSlide's level-0 read of a region, onto white (nothing scanned is glass), as JPEG."""
    with openslide.OpenSlide(path) as osr:
        rgba = osr.read_region((x, y), 0, (w, h))
    return _jpeg(Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB"))


@pytest.fixture
def live_handles(monkeypatch) -> set[int]:
    """Ids of the OpenSlide handles this process has open now (the real class, watched)."""
    live: set[int] = set()
    init, close = openslide.OpenSlide.__init__, openslide.OpenSlide.close

    def watched_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        live.add(id(self))

    def watched_close(self):
        assert id(self) in live, "closed twice"
        live.discard(id(self))
        close(self)

    monkeypatch.setattr(openslide.OpenSlide, "__init__", watched_init)
    monkeypatch.setattr(openslide.OpenSlide, "close", watched_close)
    return live


def test_dzi_and_view_describe_the_slide_as_the_platform_reads_it(slides, dz_store):
    key = _cohort_slides(dz_store)[0]
    path = _file(dz_store, *key)
    with open_slide(path) as slide:
        info = slide.info
    dzi = ET.fromstring(slides.dzi(*key))
    assert dzi.tag == f"{DZI_NS}Image"
    assert (dzi.get("TileSize"), dzi.get("Overlap"), dzi.get("Format")) == ("254", "1", "jpeg")
    size = dzi.find(f"{DZI_NS}Size")
    assert (int(size.get("Width")), int(size.get("Height"))) == (info.width, info.height)
    view = slides.describe(*key)
    assert view.dzi == slides.dzi(*key)
    assert (view.width, view.height) == (view.slide_width, view.slide_height)
    assert (view.slide_width, view.slide_height) == (info.width, info.height)
    assert (view.bounds_x, view.bounds_y) == (0, 0)  # the synthetic scans fill their image
    assert (view.mpp, view.mpp_source) == (info.mpp, "openslide")
    assert view.levels == math.ceil(math.log2(max(info.width, info.height))) + 1
    assert view.min_level == 0 and view.format == "jpeg"
    assert (view.tile_size, view.overlap) == (254, 1)


def test_tiles_decode_to_their_deep_zoom_sizes(slides, dz_store):
    key = _cohort_slides(dz_store)[0]
    view = slides.describe(*key)
    deepest = view.levels - 1
    cols = math.ceil(view.width / 254)
    last = view.width - (cols - 1) * 254 + 1  # the last column: what remains, left overlap
    expected = {(deepest, 0, 0): (255, 255), (deepest, 1, 1): (256, 256),
                (deepest, cols - 1, 1): (last, 256), (0, 0, 0): (1, 1)}  # fmt: skip
    for (level, col, row), size in expected.items():
        image = Image.open(io.BytesIO(slides.tile(*key, level, col, row)))
        assert image.format == "JPEG" and image.mode == "RGB"
        assert image.size == size, (level, col, row)


def test_deepest_tiles_are_openslides_own_read_of_the_region(slides, dz_store):
    key = _cohort_slides(dz_store)[1]
    path = _file(dz_store, *key)
    deepest = slides.describe(*key).levels - 1
    assert slides.tile(*key, deepest, 0, 0) == _region(path, 0, 0, 255, 255)
    assert slides.tile(*key, deepest, 3, 2) == _region(path, 3 * 254 - 1, 2 * 254 - 1, 256, 256)
    for level, col in ((deepest - 2, 1), (deepest - 4, 0)):  # resampled from the pyramid
        assert slides.tile(*key, level, col, 0) == _generator_tile(path, level, col, 0)


def test_bounds_offset_and_the_manifests_mpp_place_level_0_boxes(slides, dz_store):
    path = _file(dz_store, *SPARSE)
    view = slides.describe(*SPARSE)
    assert (view.bounds_x, view.bounds_y) == SPARSE_BOUNDS
    assert (view.slide_width, view.slide_height) == (2048, 2048)
    assert (view.width, view.height) == (2048 - 512, 2048 - 256)
    assert (view.mpp, view.mpp_source) == (0.5, "manifest")  # the file says 0.25
    deepest = view.levels - 1
    bx, by = SPARSE_BOUNDS
    assert slides.tile(*SPARSE, deepest, 0, 0) == _region(path, bx, by, 255, 255)
    assert slides.tile(*SPARSE, deepest, 2, 1) == _region(path, bx + 507, by + 253, 256, 256)


@pytest.mark.parametrize(
    "where",
    [(-1, 0, 0), ("levels", 0, 0), (10**30, 0, 0), ("deepest", -1, 0), ("deepest", 0, -5),
     ("deepest", "cols", 0), ("deepest", 0, "rows"), ("deepest", 0, 10**30), (0, 1, 0)],
)  # fmt: skip
def test_tiles_outside_the_pyramid_are_not_found(slides, dz_store, where):
    key = _cohort_slides(dz_store)[0]
    view = slides.describe(*key)
    deepest = view.levels - 1
    cols = rows = math.ceil(view.width / 254)
    names = {"levels": view.levels, "deepest": deepest, "cols": cols, "rows": rows}
    level, col, row = (names.get(v, v) for v in where)
    with pytest.raises(TileNotFound, match="no tile") as err:
        slides.tile(*key, level, col, row)
    assert isinstance(err.value, CCSError)


def test_tiles_that_would_decode_too_much_are_refused_and_min_level_says_where(
    dz_store, tmp_path, monkeypatch
):
    """With the bound at 256 x 256 px, the tiny slide's reads (levels 4000, 1000 and 258 px)
    exceed it below a level and at some finer ones (resampled from 2x the pixels)."""
    monkeypatch.setattr(deepzoom, "MAX_TILE_READ_PIXELS", 256 * 256)
    key = _cohort_slides(dz_store)[0]
    with openslide.OpenSlide(_file(dz_store, *key)) as osr:
        generator = DeepZoomGenerator(osr, tile_size=254, overlap=1, limit_bounds=True)
        reads = {
            (level, col, row): math.prod(generator.get_tile_coordinates(level, (col, row))[2])
            for level, (cols, rows) in enumerate(generator.level_tiles)
            for col in range(cols)
            for row in range(rows)
        }
    too_big = {level for (level, _, _), px in reads.items() if px > 256 * 256}
    assert too_big and max(too_big) + 1 < generator.level_count  # the test means something
    with DeepZoomSlides(dz_store, SlideCache(tmp_path / "c", 2**30)) as slides:
        assert slides.describe(*key).min_level == max(too_big) + 1
        for level in sorted(too_big):
            where = next(t for t, px in reads.items() if t[0] == level and px > 256 * 256)
            with pytest.raises(TileNotFound, match="coarser than its pyramid can render"):
                slides.tile(*key, *where)
        for level in set(range(generator.level_count)) - too_big:
            assert Image.open(io.BytesIO(slides.tile(*key, level, 0, 0))).format == "JPEG"


@pytest.mark.parametrize(
    "key",
    [("int-a", "b1", "nope"), ("int-a", "b9", "int-a-s0001"), ("zz", "b1", "int-a-s0001"),
     ("int-a", "b2", "int-a-s0001"), ("int-a", "b1", "../x"), ("..", "b1", "int-a-s0001"),
     ("int-a", "../../etc", "passwd"), ("int-a", "b1", ""), ("int-a", "b1", "s\n1"),
     ("int-a", "b1", "a/b"), ("int-a", "b1", ".hidden"), ("int-a", "b1", "x" * 500)],
)  # fmt: skip
def test_only_slides_of_committed_manifests_are_found(slides, dz_store, key):
    with pytest.raises(SlideNotFound, match=r"^no slide .* in batch .* of center ") as err:
        slides.describe(*key)
    message = str(err.value)
    assert isinstance(err.value, CCSError) and "\n" not in message and len(message) < 300
    assert dz_store.root not in message and "file://" not in message
    with pytest.raises(SlideNotFound):
        slides.tile(*key, 0, 0, 0)
    assert slides.open_slides() == []


def test_an_unreadable_slide_names_ids_not_paths(slides, dz_store):
    for ask in (lambda: slides.describe("bad", "b1", "broken"),
                lambda: slides.tile("bad", "b1", "broken", 0, 0, 0)):  # fmt: skip
        with pytest.raises(SlideUnreadable) as err:
            ask()
        message = str(err.value)
        assert message == "slide 'broken' in batch 'b1' of center 'bad' cannot be read now"
        assert isinstance(err.value, CCSError)
    assert slides.open_slides() == []


def test_the_lru_keeps_its_bound_of_open_slides_and_closes_the_rest(slides, dz_store, live_handles):
    keys = _cohort_slides(dz_store)
    for key in keys:
        slides.tile(*key, 0, 0, 0)
        assert len(slides.open_slides()) <= 2
        assert len(live_handles) == len(slides.open_slides())  # the evicted one was closed
    assert slides.open_slides() == keys[-2:]
    slides.describe(*keys[-2])  # a hit: now the most recently used
    assert slides.open_slides() == [keys[-1], keys[-2]]
    slides.close()
    assert slides.open_slides() == [] and live_handles == set()
    assert Image.open(io.BytesIO(slides.tile(*keys[0], 0, 0, 0))).size == (1, 1)  # reopens
    assert len(live_handles) == 1


def test_threads_read_tiles_while_slides_are_evicted_under_them(dz_store, tmp_path, live_handles):
    keys = _cohort_slides(dz_store)[:3]
    asks = [
        (key, lvl, c, r) for key in keys for lvl in (10, 11, 12) for c in (0, 1) for r in (0, 1)
    ]
    with DeepZoomSlides(dz_store, SlideCache(tmp_path / "a", 2**30)) as calm:
        want = {a: calm.tile(*a[0], *a[1:]) for a in asks}
    got: dict[int, dict] = {}
    failures: list[BaseException] = []
    with DeepZoomSlides(dz_store, SlideCache(tmp_path / "b", 2**30), max_open=1) as churn:

        def read(worker: int) -> None:
            mine = got.setdefault(worker, {})
            try:
                for i in range(3 * len(asks)):
                    a = asks[(i * 7 + worker * 5) % len(asks)]  # slides interleave across threads
                    mine[a] = churn.tile(*a[0], *a[1:])
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=read, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(churn.open_slides()) <= 1
    assert failures == []
    for mine in got.values():
        assert mine == {a: want[a] for a in mine}
    assert live_handles == set()  # every evicted slide was closed, once, after its reads


def test_the_module_keeps_the_web_ingress_torch_free():
    code = "import sys, smartccs.slide.deepzoom; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.s3
def test_a_slide_whose_cache_file_was_evicted_is_read_again_through_the_cache(
    s3_store: Store, tiny_cohort: Path, tmp_path: Path
):
    """OpenSlide reopens its file for every read, so a file the slide cache deletes is gone
    for the viewer's open handle too: the tile is read by opening the slide again through the
    cache (a new download), and the cache stays within its bound."""
    for d in sorted(p.parent for p in tiny_cohort.glob("*/manifest.json")):
        upload_batch(d, center=d.name, batch="b1", store=s3_store, progress=False)
    keys = _cohort_slides(s3_store)
    entries = {}
    for center in ("int-a", "int-b"):
        data = s3_store.read_bytes(layout.incoming(center, "b1"), MANIFEST_NAME)
        entries |= {(center, "b1", s.slide_id): s for s in Manifest.loads(data).slides}
    cache = SlideCache(tmp_path / "cache", max_bytes=max(e.bytes for e in entries.values()) + 1)
    first, second = keys[:2]
    original = tiny_cohort / first[0] / entries[first].path
    with DeepZoomSlides(s3_store, cache, max_open=4) as slides:
        assert slides.tile(*first, 12, 0, 0) == _generator_tile(original, 12, 0, 0)
        assert [e.size for e in cache.entries()] == [entries[first].bytes]
        slides.tile(*second, 12, 0, 0)  # its download evicts the first slide's file
        assert [e.size for e in cache.entries()] == [entries[second].bytes]
        assert slides.open_slides() == [first, second]
        far = slides.tile(*first, 12, 14, 15)  # no slide tile of it in OpenSlide's cache
        assert far == _generator_tile(original, 12, 14, 15)
        assert [e.size for e in cache.entries()] == [entries[first].bytes]  # downloaded again
        assert slides.open_slides() == [second, first]
        assert cache.total_bytes() <= cache.max_bytes


@pytest.mark.s3
def test_a_slide_being_viewed_counts_as_used_in_the_cache(
    s3_store: Store, tiny_cohort: Path, tmp_path: Path, monkeypatch
):
    """Tiles of a slide kept open are read without asking the cache again; they still mark
    its file used, so a download evicts a slide nobody looks at first. A local store's own
    file is never touched."""
    import os

    for d in sorted(p.parent for p in tiny_cohort.glob("*/manifest.json")):
        upload_batch(d, center=d.name, batch="b1", store=s3_store, progress=False)
    first, second = _cohort_slides(s3_store)[:2]
    cache = SlideCache(tmp_path / "cache", max_bytes=2**30)
    monkeypatch.setattr(deepzoom, "MARK_USED_EVERY_S", 0.0)
    with DeepZoomSlides(s3_store, cache, max_open=4) as slides:
        slides.tile(*first, 12, 0, 0)
        slides.tile(*second, 12, 0, 0)
        for entry in cache.entries():
            os.utime(entry.path, (1, 1))  # both long unused
        slides.tile(*first, 12, 1, 0)  # the viewer pans the first slide
        used = {e.path: e.used for e in cache.entries()}
        assert sorted(used.values())[0] == 1, "the slide nobody looked at stays old"
        assert max(used.values()) > 1e9, "the slide being viewed was marked used"
    local = tmp_path / "store-file.svs"
    local.write_bytes(b"x")
    os.utime(local, (1, 1))
    cache.mark_used(local)
    assert local.stat().st_mtime == 1, "not a cache entry: left alone"
