"""inspect_slide: what a slide is and what screening would make of it, local or on S3."""

from __future__ import annotations

from pathlib import Path

import pytest
from slide_factory import disc_slide, write_disc_slide

from smartccs.errors import MissingMppError
from smartccs.slide.cache import SlideCache
from smartccs.slide.inspect import SlideReport, format_report, inspect_slide
from smartccs.slide.reader import open_slide
from smartccs.slide.tiling import TilingConfig, plan_tiles
from smartccs.store import Store

DISCS = [(150, 150, 20), (450, 450, 20)]


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inspect") / "slide.svs"
    return disc_slide(path, mpp=0.25, size_um=(900, 600), discs=DISCS)


def test_report_says_what_the_file_is_and_what_screening_would_read(slide: Path):
    report = inspect_slide(str(slide))
    with open_slide(slide) as opened:
        plan = plan_tiles(opened, TilingConfig())
    assert report.name == "slide.svs"
    assert report.path == str(slide.resolve())
    assert report.vendor == "aperio"
    assert (report.width, report.height) == (3600, 2400)
    assert report.levels[:2] == [(3600, 2400, 1.0), (1800, 1200, 2.0)]
    assert (report.mpp, report.mpp_source, report.objective_power) == (0.25, "openslide", 40)
    assert report.bytes == slide.stat().st_size
    assert report.tile_count == len(plan.tiles) == 2
    assert report.foreground_fraction == pytest.approx(plan.foreground_fraction)
    assert report.tiling == TilingConfig() and report.tiling_error is None
    assert SlideReport.model_validate_json(report.model_dump_json()) == report


def test_tiling_and_override_are_applied(slide: Path):
    report = inspect_slide(str(slide), mpp_override=0.2, tiling=TilingConfig(tile_px=300))
    assert (report.mpp, report.mpp_source) == (0.2, "override")
    assert report.tiling.tile_px == 300
    assert report.tile_count == 2


def test_text_report_is_aligned_and_complete(slide: Path):
    text = format_report(inspect_slide(str(slide)))
    lines = text.splitlines()
    labels = [line[:12].strip() for line in lines]
    assert labels[:4] == ["slide", "path", "vendor", "dimensions"]
    assert {"mpp", "objective", "size", "foreground", "tiles"} <= set(labels)
    column = {len(line) - len(line[12:].lstrip()) for line in lines}
    assert column == {12}  # every value starts in the same column
    assert "3600 x 2400 px (0.90 x 0.60 mm)" in text
    assert "0.25 µm/px (from openslide)" in text
    assert "2 of 600 px at 0.5 µm/px (300 µm)" in text


def test_blank_slide_is_reported_not_failed(tmp_path: Path):
    path = disc_slide(tmp_path / "blank.svs", mpp=0.5, size_um=(600, 600), discs=[])
    report = inspect_slide(str(path))
    assert report.tile_count is None and report.foreground_fraction is None
    assert report.tiling_error.startswith("no cells found")
    assert "tiles       none: no cells found" in format_report(report)


def test_slide_without_mpp_is_an_error_unless_overridden(tmp_path: Path):
    path = write_disc_slide(tmp_path / "nompp.tiff", fmt="tiff", mpp=None, size_px=1200)
    with pytest.raises(MissingMppError, match=r"^nompp\.tiff: no microns-per-pixel"):
        inspect_slide(str(path))
    assert inspect_slide(str(path), mpp_override=0.25).mpp_source == "override"


@pytest.mark.s3
def test_s3_slide_is_inspected_through_the_cache(slide, s3_store: Store, tmp_path: Path):
    s3_store.put_file(slide, "incoming/c1/b1/slide.svs")
    uri = s3_store.uri("incoming/c1/b1/slide.svs")
    cache = SlideCache(tmp_path / "cache", max_bytes=10 * slide.stat().st_size)
    report = inspect_slide(uri, store=s3_store, cache=cache)
    local = inspect_slide(str(slide))
    assert report.path == uri and report.name == "slide.svs"
    assert report.model_dump(exclude={"path"}) == local.model_dump(exclude={"path"})
    assert len(cache.entries()) == 1


@pytest.mark.s3
def test_s3_uri_without_a_store_uses_the_environment(
    slide, s3_store: Store, s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    s3_store.put_file(slide, "x/slide.svs")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    cache = SlideCache(tmp_path / "cache", max_bytes=10 * slide.stat().st_size)
    report = inspect_slide(s3_store.uri("x/slide.svs"), cache=cache)
    assert report.tile_count == 2
