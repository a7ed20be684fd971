"""Per-tile QC separates sharp from blurred and empty from full tiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter
from slide_factory import disc_slide

from smartccs.slide.qc import tile_qc
from smartccs.slide.reader import open_slide
from smartccs.slide.tiling import TilingConfig, plan_tiles, read_tile

CFG = TilingConfig()


@pytest.fixture(scope="module")
def tile(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """A real tile read through the library: a 300 µm field with a dozen cells."""
    rng = np.random.default_rng(1)
    discs = [
        (float(x), float(y), float(r))
        for x, y, r in zip(
            rng.uniform(20, 280, 12), rng.uniform(20, 280, 12), rng.uniform(8, 20, 12), strict=True
        )
    ]
    path = tmp_path_factory.mktemp("qc") / "s.svs"
    disc_slide(path, mpp=0.25, size_um=(300, 300), discs=discs)
    with open_slide(path) as slide:
        return read_tile(slide, plan_tiles(slide, CFG).tiles[0], CFG)


def blurred(rgb: np.ndarray, sigma: float) -> np.ndarray:
    return np.asarray(
        Image.fromarray(np.ascontiguousarray(rgb)).filter(ImageFilter.GaussianBlur(sigma))
    )


def test_blurred_tile_scores_far_lower_than_the_sharp_one(tile):
    sharp = tile_qc(tile)
    soft, softer = tile_qc(blurred(tile, 1.5)), tile_qc(blurred(tile, 3))
    assert sharp.blur > 3 * soft.blur and soft.blur > 3 * softer.blur
    assert soft.background_fraction == pytest.approx(sharp.background_fraction, abs=0.05)


def test_empty_tile_is_all_background_and_a_full_one_none(tile):
    glass = np.full((600, 600, 3), (240, 238, 241), np.uint8)
    empty = tile_qc(glass)
    assert empty.background_fraction == 1.0
    assert empty.blur is None  # no cells: focus is undefined, not zero
    full = tile_qc(np.full((600, 600, 3), (150, 110, 170), np.uint8))
    assert full.background_fraction == 0.0
    assert full.mean_od > 0.25 > 0.05 > empty.mean_od
    partly = tile_qc(tile)
    assert 0.5 < partly.background_fraction < 1.0
    assert empty.mean_od < partly.mean_od < full.mean_od


def test_qc_of_the_read_view_equals_qc_of_a_copy(tile):
    assert not tile.flags.c_contiguous  # read_tile hands out a view of the RGBA buffer
    assert tile_qc(tile) == tile_qc(np.ascontiguousarray(tile))


def test_qc_round_trips_as_a_row(tile, tmp_path: Path):
    qc = tile_qc(tile)
    assert type(qc).model_validate(qc.model_dump()) == qc


def test_tinted_glass_is_glass_under_the_slides_own_thresholds(tmp_path):
    """An external center's cream glass (saturation above the clean-glass floor) is not cells."""
    cream = (249, 242, 230)
    path = disc_slide(
        tmp_path / "cream.svs",
        mpp=0.5,
        size_um=(1200, 1200),
        discs=[(300, 300, 40), (900, 800, 40)],
        glass=cream,
    )
    with open_slide(path) as slide:
        plan = plan_tiles(slide, CFG)
    glass_only = np.full((CFG.tile_px, CFG.tile_px, 3), cream, np.uint8)
    fixed = tile_qc(glass_only)
    own = tile_qc(
        glass_only,
        saturation_threshold=plan.saturation_threshold,
        od_threshold=plan.od_threshold,
    )
    assert fixed.background_fraction < 0.5  # the fixed floor mistakes cream glass for cells
    assert own.background_fraction == 1.0
