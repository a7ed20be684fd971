"""Real vendor files (OpenSlide's own test slides): Aperio, generic TIFF, DICOM, broken ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from smartccs.errors import MissingMppError, SlideError
from smartccs.slide.inspect import format_report, inspect_slide
from smartccs.slide.reader import open_slide


def test_real_aperio_svs(openslide_fixtures: Path):
    with open_slide(openslide_fixtures / "small.svs") as slide:
        info = slide.info
        rgb = slide.read_rgb(0, 0, 0, info.width, info.height)
    assert info.vendor == "aperio"
    assert (info.width, info.height) == (16, 16)
    assert (info.mpp, info.mpp_source, info.objective_power) == (0.499, "openslide", 20)
    assert rgb.shape == (16, 16, 3)


@pytest.mark.parametrize("name", ["boxes_0.dcm", "boxes_1.dcm"])
def test_dicom_wsi(openslide_fixtures: Path, name: str):
    report = inspect_slide(str(openslide_fixtures / name))
    assert report.vendor == "dicom"
    assert (report.width, report.height) == (16, 16)
    assert (report.mpp, report.mpp_source) == (0.499, "openslide")
    assert format_report(report).splitlines()[2] == "vendor      dicom"


def test_generic_tiff_with_a_screen_resolution_needs_an_override(openslide_fixtures: Path):
    path = openslide_fixtures / "boxes.tiff"
    with pytest.raises(MissingMppError, match=r"^boxes\.tiff: the file declares 352\.8 µm/px"):
        open_slide(path)
    report = inspect_slide(str(path), mpp_override=0.25)
    assert report.vendor == "generic-tiff"
    assert (report.width, report.height) == (300, 250)
    assert [lvl[:2] for lvl in report.levels] == [(300, 250), (150, 125), (75, 62), (37, 31)]
    assert report.tile_count == 1  # 75 x 62.5 µm of coloured boxes: one 300 µm tile
    with open_slide(path, mpp_override=0.25) as slide:
        level2 = slide.read_rgb(2, 0, 0, 75, 62)
    assert level2.shape == (62, 75, 3) and np.ptp(level2) > 100  # real content, not blank


def test_unopenable_tiff_is_one_line(openslide_fixtures: Path):
    with pytest.raises(SlideError) as exc:
        open_slide(openslide_fixtures / "unopenable.tiff")
    assert str(exc.value) == (
        "unopenable.tiff: OpenSlide cannot open it: Unsupported TIFF compression: 52479"
    )


def test_unreadable_svs_opens_but_its_pixels_fail_in_one_line(openslide_fixtures: Path):
    path = openslide_fixtures / "unreadable.svs"
    with open_slide(path) as slide, pytest.raises(SlideError) as exc:
        slide.read_rgb(0, 0, 0, 16, 16)
    assert str(exc.value) == (
        "unreadable.svs: cannot read level 0 region at (0, 0) size 16x16: Bogus marker length"
    )
    with pytest.raises(SlideError, match=r"^unreadable\.svs: cannot read .* Bogus marker"):
        inspect_slide(str(path))


def test_unreachable_index_is_a_clear_reason_to_skip(tmp_path: Path, monkeypatch):
    from vendor_fixtures import fetch_openslide_fixtures

    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(RuntimeError, match="pip download failed: "):
        fetch_openslide_fixtures(tmp_path / "cache")
