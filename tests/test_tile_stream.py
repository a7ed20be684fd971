"""The Ray Data tile stream yields exactly the planned tiles, from local and S3 stores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import ray

from smartccs import layout
from smartccs.batches import BatchRef, commit_batch, load_batch
from smartccs.checksums import sha256_file
from smartccs.data.tiles import (
    NO_TILE,
    STATUS_ERROR,
    STATUS_OK,
    StreamConfig,
    plan_stream,
    slide_rows,
)
from smartccs.data.tiles import tile_stream as make_stream
from smartccs.manifest import Manifest, SlideEntry
from smartccs.slide.reader import open_slide
from smartccs.slide.tiling import TilingConfig, plan_tiles
from smartccs.store import Store
from smartccs.upload import upload_batch

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session")]

TILING = TilingConfig(target_mpp=1.0, tile_px=128)
"""Small tiles keep the test fast; the grid logic is the same at any size."""


def stream_config(tmp_path: Path) -> StreamConfig:
    return StreamConfig(tiling=TILING, readers=2, batch_size=8, cache_dir=str(tmp_path / "cache"))


def collect(ds) -> list[dict]:
    """Rows without pixels, after checking every image."""
    rows = []
    for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
        images = batch.pop("image")
        assert images.shape[1:] == (TILING.tile_px, TILING.tile_px, 3)
        for i in range(len(images)):
            row = {k: v[i].item() if hasattr(v[i], "item") else v[i] for k, v in batch.items()}
            if row["status"] == STATUS_OK:
                assert images[i].std() > 0, "an ok tile has pixels"
            rows.append(row)
    return rows


def upload_cohort(cohort: Path, store: Store, centers: int | None = None) -> list[BatchRef]:
    dirs = sorted(p.parent for p in cohort.glob("*/manifest.json"))[:centers]
    return [upload_batch(d, center=d.name, batch="b1", store=store, progress=False) for d in dirs]


def planned(cohort: Path, refs: list[BatchRef]) -> set[tuple]:
    expected = set()
    for ref in refs:
        for s in ref.manifest.slides:
            with open_slide(cohort / ref.center / s.path) as slide:
                plan = plan_tiles(slide, TILING)
            expected |= {(s.slide_id, t.index, t.x0, t.y0, t.level) for t in plan.tiles}
    return expected


@pytest.mark.parametrize("store_kind", ["local", "s3"])
def test_stream_yields_exactly_the_planned_tiles(request, tiny_cohort, tmp_path, store_kind):
    store: Store = request.getfixturevalue(f"{store_kind}_store")
    refs = upload_cohort(tiny_cohort, store, centers=1 if store_kind == "s3" else None)
    rows = collect(make_stream(slide_rows(refs), store.config, stream_config(tmp_path)))
    assert {r["status"] for r in rows} == {STATUS_OK}
    got = [(r["slide_id"], r["tile_index"], r["x0"], r["y0"], r["level"]) for r in rows]
    assert len(got) == len(set(got)), "no tile twice"
    assert set(got) == planned(tiny_cohort, refs)
    for r in rows:
        assert r["n_tiles"] == sum(1 for g in got if g[0] == r["slide_id"])
        assert 0.0 <= r["background_fraction"] <= 1.0


def test_broken_slide_becomes_one_error_row_and_the_rest_go_on(tiny_cohort, tmp_path, any_store):
    center_dir = sorted(p.parent for p in tiny_cohort.glob("*/manifest.json"))[0]
    good = Manifest.loads((center_dir / "manifest.json").read_bytes()).slides
    prefix = layout.incoming("c1", "b1")
    broken = tmp_path / "broken.svs"
    data = (center_dir / good[0].path).read_bytes()
    broken.write_bytes(data[: len(data) // 3])  # truncated mid-file
    entries = []
    for s in good:
        any_store.put_file(center_dir / s.path, f"{prefix}/{s.path}")
        entries.append(s)
    any_store.put_file(broken, f"{prefix}/broken.svs")
    entries.append(
        SlideEntry(
            slide_id="broken",
            path="broken.svs",
            sha256=sha256_file(broken),
            bytes=broken.stat().st_size,
        )
    )
    commit_batch(any_store, Manifest(center="c1", batch="b1", slides=entries))
    ref = load_batch(any_store, "c1", "b1")
    rows = collect(make_stream(slide_rows([ref]), any_store.config, stream_config(tmp_path)))

    errors = [r for r in rows if r["slide_id"] == "broken"]
    assert len(errors) == 1
    assert errors[0]["status"] == STATUS_ERROR and errors[0]["tile_index"] == NO_TILE
    assert "broken.svs" in errors[0]["error"]
    ok = {(r["slide_id"], r["tile_index"]) for r in rows if r["slide_id"] != "broken"}
    assert all(r["status"] == STATUS_OK for r in rows if r["slide_id"] != "broken")
    assert {k[0] for k in ok} == {s.slide_id for s in good}


def test_two_scans_of_one_specimen_give_the_same_physical_grid(tmp_path, local_store):
    from smartccs.synth.profiles import load_profiles
    from smartccs.synth.scan import render_slide
    from smartccs.synth.specimen import make_specimen

    profile = load_profiles(None)[0]
    specimen = make_specimen(np.random.default_rng(7), 1000.0, 1000.0, profile, "HSIL")
    scans = tmp_path / "scans"
    scans.mkdir()
    render_slide(specimen, profile, scans / "at025.tiff", mpp=0.25, fmt="tiff")
    render_slide(specimen, profile, scans / "at050.tiff", mpp=0.5, fmt="tiff")
    ref = upload_batch(scans, center="c1", batch="b1", store=local_store, progress=False)
    rows = collect(make_stream(slide_rows([ref]), local_store.config, stream_config(tmp_path)))
    grids = {}
    for sid, mpp in (("at025", 0.25), ("at050", 0.5)):
        grids[sid] = {
            (round(r["x0"] * mpp, 3), round(r["y0"] * mpp, 3), round(r["w0"] * mpp, 3))
            for r in rows
            if r["slide_id"] == sid
        }
    assert grids["at025"] and grids["at025"] == grids["at050"]


def test_a_slide_evicted_from_the_cache_is_reopened_not_read_through_a_dead_handle(
    tiny_cohort, tmp_path, s3_store
):
    """OpenSlide 4 rereads a TIFF-based slide by path on every read: a handle whose cache
    file was evicted (another download needed the room) would fail its next read. The
    reader's open slides reopen through the cache instead."""
    from smartccs.data.tiles import _SlideHandles

    [ref] = upload_cohort(tiny_cohort, s3_store, centers=1)
    row = slide_rows([ref])[0]
    handles = _SlideHandles(s3_store.config, stream_config(tmp_path))
    first = handles.get(row)
    want = first.read_rgb(0, 0, 0, 64, 64)
    first.path.unlink()  # what the cache's eviction does
    again = handles.get(row)
    assert again is not first and again.path.exists()
    assert np.array_equal(again.read_rgb(0, 0, 0, 64, 64), want)


def test_a_slide_s_plan_reaches_the_actors_in_blocks_of_one_call(
    tiny_cohort, tmp_path, local_store
):
    """One slide's tiles are cut into blocks no bigger than one downstream call, inside the
    planning tasks (no operator of its own): as one block, a slide goes whole to one scorer."""
    refs = upload_cohort(tiny_cohort, local_store, centers=1)
    rows = slide_rows(refs)
    drop = rows[0]["slide_id"]  # a slide whose every tile the selection drops: no rows, no error
    ds = plan_stream(
        rows, local_store.config, stream_config(tmp_path), block_rows=5,
        select=lambda r: r["slide_id"] != drop,
    )  # fmt: skip
    sizes, got = [], []
    for bundle in ds.iter_internal_ref_bundles():
        for block, meta in zip(bundle.block_refs, bundle.metadata, strict=True):
            if not meta.num_rows:  # the dropped slide's empty block
                continue
            sizes.append(meta.num_rows)
            table = ray.get(block)
            got += zip(table["slide_id"].to_pylist(), table["tile_index"].to_pylist(), strict=True)
    expected = {(s, i) for s, i, *_ in planned(tiny_cohort, refs) if s != drop}
    assert sorted(got) == sorted(expected)
    assert max(sizes) <= 5 and len(sizes) >= len(expected) / 5
    assert "MapBatches(_plan_batch)->StreamingRepartition" in ds.stats(), "fused into planning"
    read = make_stream(
        rows, local_store.config, stream_config(tmp_path), select=lambda r: r["slide_id"] != drop
    )
    assert {(r["slide_id"], r["tile_index"]) for r in collect(read)} == expected
