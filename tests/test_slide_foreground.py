"""Foreground for cytology: sparse cells on glass, found at a fixed physical resolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from slide_factory import disc_slide

from smartccs.slide.foreground import ForegroundConfig, foreground_from_rgb, foreground_mask
from smartccs.slide.reader import open_slide

SIZE_UM = (1600.0, 1200.0)
DISCS = [(200, 200, 20), (800, 600, 30), (1400, 1000, 15)]
FAR_FROM_CELLS = [(600, 1000), (1200, 200), (50, 1150)]


def mask_of(path: Path, **kw):
    with open_slide(path) as slide:
        return foreground_mask(slide, **kw)


def at(fg, x_um: float, y_um: float) -> bool:
    return bool(fg.mask[int(y_um / fg.mpp), int(x_um / fg.mpp)])


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> dict[float, Path]:
    d = tmp_path_factory.mktemp("fg")
    return {
        mpp: disc_slide(d / f"{mpp}.svs", mpp=mpp, size_um=SIZE_UM, discs=DISCS)
        for mpp in (0.25, 0.5)
    }


def test_mask_finds_the_cells_and_nothing_else(cells):
    fg = mask_of(cells[0.25])
    assert fg.mpp == 8.0
    assert fg.mask.shape == (150, 200)  # 1200 x 1600 µm at 8 µm/px
    for x, y, _ in DISCS:
        assert at(fg, x, y)
    for x, y in FAR_FROM_CELLS:
        assert not at(fg, x, y)
    # every foreground pixel is a cell or its border, a few mask pixels wide: partly covered
    # pixels, the JPEG halo of the coarse level it was read from, and the 8 µm dilation
    ys, xs = np.nonzero(fg.mask)
    cx, cy = (xs + 0.5) * fg.mpp, (ys + 0.5) * fg.mpp
    near = np.zeros(len(xs), bool)
    for x, y, r in DISCS:
        near |= np.hypot(cx - x, cy - y) <= r + 4 * fg.mpp
    assert near.all()


def test_two_scan_resolutions_give_the_same_mask(cells):
    fine, coarse = mask_of(cells[0.25]), mask_of(cells[0.5])
    assert fine.mask.shape == coarse.mask.shape
    assert (fine.mask == coarse.mask).mean() > 0.999


def test_mask_resolution_is_physical(cells):
    fg = mask_of(cells[0.5], mask_mpp=16.0)
    assert fg.mask.shape == (75, 100)
    assert at(fg, 800, 600)


def test_empty_glass_has_no_foreground(tmp_path: Path):
    path = disc_slide(tmp_path / "blank.svs", mpp=0.5, size_um=SIZE_UM, discs=[])
    fg = mask_of(path)
    assert not fg.mask.any() and fg.fraction == 0.0


def test_tinted_glass_is_background_the_cells_on_it_are_not(tmp_path: Path):
    # mounting medium or white balance can tint the whole glass (saturation 0.12 here, above
    # the floor): the threshold follows this slide's own background, not a fixed number
    tinted = (214, 226, 244)
    path = disc_slide(tmp_path / "t.svs", mpp=0.5, size_um=SIZE_UM, discs=DISCS, glass=tinted)
    fg = mask_of(path)
    assert fg.saturation_threshold > 0.13  # above the glass's own saturation
    assert all(at(fg, x, y) for x, y, _ in DISCS)
    assert not any(at(fg, x, y) for x, y in FAR_FROM_CELLS)
    assert fg.fraction < 0.03


def test_pale_cytoplasm_counts_and_faint_noise_does_not():
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(238, 2, size=(100, 100, 3)), 0, 255).astype(np.uint8)
    glass[40:60, 40:60] = (205, 220, 228)  # a pale cyanophilic cell: saturation 0.10
    fg = foreground_from_rgb(glass, 8.0, ForegroundConfig(dilate_um=0))
    assert fg.mask[40:60, 40:60].all()
    assert fg.mask.sum() == 400
