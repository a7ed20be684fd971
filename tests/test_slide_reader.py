"""open_slide: the pixel size is known or refused, and every broken file is one clear line."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from slide_factory import CELL, GLASS, disc_slide, plain_tiff, tiff_bomb, write_disc_slide

from smartccs.errors import CCSError, MissingMppError, SlideError
from smartccs.slide.reader import copy_rgb, open_slide


@pytest.fixture(scope="module")
def svs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 x 0.75 mm at 0.25 µm/px with one cell at (100, 100) µm, r = 20 µm."""
    path = tmp_path_factory.mktemp("reader") / "slide.svs"
    return disc_slide(path, mpp=0.25, size_um=(1000, 750), discs=[(100, 100, 20)])


def one_line_error(exc: pytest.ExceptionInfo, name: str) -> str:
    message = str(exc.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(f"{name}: "), message
    return message


def test_aperio_svs_reports_vendor_levels_and_mpp_from_openslide(svs: Path):
    with open_slide(svs) as slide:
        info = slide.info
    assert info.vendor == "aperio"
    assert (info.width, info.height) == (4000, 3000)
    assert info.level_dimensions[:3] == ((4000, 3000), (2000, 1500), (1000, 750))
    assert info.level_downsamples[:3] == (1.0, 2.0, 4.0)
    assert info.mpp == pytest.approx(0.25)
    assert info.mpp_source == "openslide"
    assert info.objective_power == 40
    assert info.bytes == svs.stat().st_size


def test_generic_tiff_mpp_comes_from_its_resolution_tags(tmp_path: Path):
    path = disc_slide(tmp_path / "s.tiff", mpp=0.5, size_um=(500, 500), discs=[], fmt="tiff")
    with open_slide(path) as slide:
        assert slide.info.vendor == "generic-tiff"
        assert slide.info.mpp == pytest.approx(0.5)


def test_tiff_resolution_is_used_when_the_vendor_driver_ignores_it(tmp_path: Path):
    # an Aperio description without MPP: OpenSlide's aperio driver reports no mpp-x, but the
    # TIFF resolution tags (1 px = 1/101600 inch = 0.25 µm) still say what the pixel size is
    description = (
        "Aperio Image Library v12.0.15 \r\n512x512 [0,0 512x512] (256x256) JPEG|AppMag = 40"
    )
    path = plain_tiff(
        tmp_path / "nompp.svs",
        description=description,
        resolution=(101600, 101600),
        resolutionunit="INCH",
    )
    with open_slide(path) as slide:
        assert slide.info.vendor == "aperio"
        assert slide.info.mpp == pytest.approx(0.25)
        assert slide.info.mpp_source == "tiff-resolution"


def test_manifest_override_wins_over_the_file(svs: Path):
    with open_slide(svs, mpp_override=0.26) as slide:
        assert slide.info.mpp == 0.26
        assert slide.info.mpp_source == "manifest"


@pytest.mark.parametrize("fmt", ["svs", "tiff"])
def test_slide_without_mpp_is_refused_with_a_hint_never_guessed(tmp_path: Path, fmt: str):
    path = write_disc_slide(tmp_path / f"nompp.{fmt}", fmt=fmt, mpp=None, size_px=512)
    with pytest.raises(MissingMppError) as exc:
        open_slide(path)
    assert one_line_error(exc, path.name) == (
        f"{path.name}: no microns-per-pixel in the file; pass an mpp override in the manifest"
    )
    with open_slide(path, mpp_override=0.25) as slide:  # the manifest can rescue it
        assert slide.info.mpp == 0.25


def test_screen_resolution_default_is_not_taken_for_a_pixel_size(tmp_path: Path):
    # 72 dpi, what image editors write: 352.8 µm/px is no microscope scan
    path = plain_tiff(tmp_path / "72dpi.tiff", resolution=(72, 72), resolutionunit="INCH")
    with pytest.raises(MissingMppError, match=r"declares 352\.8 µm/px.*mpp override"):
        open_slide(path)


def test_broken_override_is_refused(svs: Path):
    with pytest.raises(SlideError, match="not a positive number"):
        open_slide(svs, mpp_override=0.0)


def _zero_bytes(p: Path) -> str:
    p.write_bytes(b"")
    return "empty file"


def _truncated(p: Path, svs: Path) -> str:
    p.write_bytes(svs.read_bytes()[: svs.stat().st_size // 2])
    return "TIFF that OpenSlide cannot open"


def _garbage(p: Path) -> str:
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return "not a whole-slide image"


def _png_named_svs(p: Path) -> str:
    Image.new("RGB", (64, 64), "white").save(p, format="PNG")
    return "looks like a PNG image"


def _text_named_tiff(p: Path) -> str:
    p.write_text("patient notes")
    return "not a whole-slide image"


def _striped_tiff(p: Path) -> str:
    tifffile.imwrite(p, np.zeros((64, 64, 3), np.uint8), photometric="rgb")  # strips
    return "not a tiled pyramid"


@pytest.mark.parametrize(
    ("filename", "make"),
    [
        ("zero.svs", _zero_bytes),
        ("truncated.svs", _truncated),
        ("garbage.svs", _garbage),
        ("photo.svs", _png_named_svs),
        ("notes.tiff", _text_named_tiff),
        ("plain.tiff", _striped_tiff),
    ],
)
def test_unopenable_file_is_one_line_slide_error_naming_it(tmp_path, svs, filename, make):
    path = tmp_path / filename
    args = (path, svs) if make is _truncated else (path,)
    reason = make(*args)
    with pytest.raises(SlideError) as exc:
        open_slide(path)
    assert reason in one_line_error(exc, filename)


def test_missing_file_and_directory_are_slide_errors(tmp_path: Path):
    with pytest.raises(SlideError, match="gone.svs: file not found"):
        open_slide(tmp_path / "gone.svs")
    (tmp_path / "dir.svs").mkdir()
    with pytest.raises(SlideError, match="dir.svs: is a directory"):
        open_slide(tmp_path / "dir.svs")


def test_error_names_the_slide_as_the_caller_calls_it(tmp_path: Path):
    path = tmp_path / "0a1b2c.bin"
    path.write_bytes(b"")
    with pytest.raises(SlideError) as exc:
        open_slide(path, name="incoming/c1/b1/slide-7.svs")
    one_line_error(exc, "incoming/c1/b1/slide-7.svs")


def test_slide_with_a_right_extension_but_wrong_content_still_opens(svs: Path, tmp_path: Path):
    # OpenSlide sniffs content, not names: an SVS saved as .tif is a fine slide
    copy = tmp_path / "renamed.tif"
    shutil.copy(svs, copy)
    with open_slide(copy) as slide:
        assert slide.info.vendor == "aperio"


def test_corrupt_tile_fails_the_read_with_one_line(svs: Path, tmp_path: Path):
    data = bytearray(svs.read_bytes())
    page = tifffile.TiffFile(svs).pages[0]
    off, count = page.dataoffsets[3], page.databytecounts[3]
    data[off + 200 : off + count - 10] = bytes(count - 210)  # zero the middle of a JPEG tile
    path = tmp_path / "corrupt.svs"
    path.write_bytes(bytes(data))
    with open_slide(path) as slide, pytest.raises(SlideError) as exc:
        slide.read_rgb(0, 0, 0, 1024, 256)
    assert "cannot read level 0 region at (0, 0)" in one_line_error(exc, "corrupt.svs")


@pytest.mark.parametrize("side", [600_000, 200_000])
def test_tiff_bomb_is_refused_before_any_pixel_is_read(tmp_path: Path, side: int):
    # 600k px a side breaks the side limit; 200k x 200k (40 Gpx) the pixel-count limit
    path = tiff_bomb(tmp_path / "bomb.tiff", side)
    assert path.stat().st_size < 2_000_000
    with pytest.raises(SlideError) as exc:
        open_slide(path)
    assert f"declares {side}x{side} px" in one_line_error(exc, "bomb.tiff")


def test_slide_errors_are_ccs_errors_for_the_cli():
    assert issubclass(SlideError, CCSError) and issubclass(MissingMppError, SlideError)


def test_read_rgb_is_level_0_addressed_and_white_beyond_the_edge(svs: Path):
    with open_slide(svs) as slide:
        # the cell at (100, 100) µm = (400, 400) px at level 0 = (200, 200) px at level 1
        tile = slide.read_rgb(1, 0, 0, 300, 300)
        assert tile.shape == (300, 300, 3) and tile.dtype == np.uint8
        assert np.abs(tile[200, 200].astype(int) - CELL).max() <= 12
        assert np.abs(tile[50, 250].astype(int) - GLASS).max() <= 12
        edge = slide.read_rgb(0, 3900, 2900, 200, 200)  # three quarters beyond the slide
        assert (edge[100:, :] == 255).all() and (edge[:, 100:] == 255).all()
        assert np.abs(edge[:100, :100].astype(int) - GLASS).max() <= 12


def test_best_level_is_the_coarsest_fine_enough(svs: Path):
    with open_slide(svs) as slide:
        assert slide.best_level(1.0) == 0
        assert slide.best_level(2.0) == 1
        assert slide.best_level(3.9) == 1
        assert slide.best_level(4.05) == 2  # within the 2% tolerance of level 2
        assert slide.best_level(0.5) == 0


def test_copy_rgb_equals_plain_assignment_from_a_strided_view():
    rgba = np.random.default_rng(0).integers(0, 256, (37, 53, 4), dtype=np.uint8)
    view = rgba[..., :3]
    out = np.empty((37, 53, 3), np.uint8)
    copy_rgb(out, view)
    assert np.array_equal(out, view)
