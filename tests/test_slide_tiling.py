"""The tile grid is physical: the same glass scanned at 0.25 and 0.5 µm/px gives the same tiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from slide_factory import GLASS, disc_slide

from smartccs.errors import NoForegroundError, TooCoarseError
from smartccs.slide.reader import Slide, open_slide
from smartccs.slide.tiling import (
    TilePlan,
    TileSpec,
    TilingConfig,
    plan_tiles,
    read_tile,
)

SIZE_UM = (1350.0, 1200.0)  # 4.5 x 4 tiles of 300 µm: the last column is a partial tile
# one cell in the middle of tiles (0, 0), (2, 1) and (3, 3), one in the partial column 4
DISCS = [(150, 150, 15), (750, 450, 15), (1050, 1050, 15), (1290, 450, 15)]
EXPECTED = {(0, 0), (2, 1), (3, 3), (4, 1)}  # (col, row)
CFG = TilingConfig()


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same glass as four scans: 0.25 and 0.5 µm/px, a 4x pyramid, an odd 0.3 µm/px."""
    d = tmp_path_factory.mktemp("scans")
    return {
        "0.25": disc_slide(d / "q.svs", mpp=0.25, size_um=SIZE_UM, discs=DISCS),
        "0.5": disc_slide(d / "h.tiff", mpp=0.5, size_um=SIZE_UM, discs=DISCS, fmt="tiff"),
        "0.25-f4": disc_slide(
            d / "f4.svs", mpp=0.25, size_um=SIZE_UM, discs=DISCS, pyramid_factor=4
        ),
        "0.3": disc_slide(d / "odd.svs", mpp=0.3, size_um=SIZE_UM, discs=DISCS),
    }


def plan(path: Path) -> TilePlan:
    with open_slide(path) as slide:
        return plan_tiles(slide, CFG)


def physical(p: TilePlan) -> list[tuple[int, int, float, float, float]]:
    """(col, row, x µm, y µm, size µm) of every selected tile."""
    mpp = p.info.mpp
    return [(t.col, t.row, t.x0 * mpp, t.y0 * mpp, t.w0 * mpp) for t in p.tiles]


def test_tiles_with_cells_are_selected_and_the_partial_edge_column_is_kept(scans):
    p = plan(scans["0.25"])
    assert (p.cols, p.rows) == (5, 4)
    assert {(t.col, t.row) for t in p.tiles} == EXPECTED
    assert [t.index for t in p.tiles] == list(range(len(p.tiles)))
    assert all(t.fg_fraction >= CFG.min_foreground for t in p.tiles)
    assert 0 < p.foreground_fraction < 0.05


def test_two_scan_resolutions_give_the_same_physical_grid_and_selection(scans):
    fine, coarse = plan(scans["0.25"]), plan(scans["0.5"])
    assert physical(fine) == physical(coarse)
    assert [t.fg_fraction for t in fine.tiles] == [t.fg_fraction for t in coarse.tiles]
    for t in fine.tiles:
        assert (t.w0, t.h0) == (1200, 1200) and (t.x0, t.y0) == (1200 * t.col, 1200 * t.row)
    for t in coarse.tiles:
        assert (t.w0, t.h0) == (600, 600) and (t.x0, t.y0) == (600 * t.col, 600 * t.row)
    odd = plan(scans["0.3"])
    assert [(t.col, t.row) for t in odd.tiles] == [(t.col, t.row) for t in fine.tiles]
    assert np.allclose(np.array(physical(odd)), np.array(physical(fine)), atol=0.3)


def tiles_of(path: Path) -> dict[tuple[int, int], np.ndarray]:
    with open_slide(path) as slide:
        return {(t.col, t.row): read_tile(slide, t, CFG) for t in plan_tiles(slide, CFG).tiles}


@pytest.mark.parametrize("other", ["0.5", "0.25-f4", "0.3"])
def test_read_tile_gives_the_same_pixels_whatever_the_scan(scans, other):
    ref, got = tiles_of(scans["0.25"]), tiles_of(scans[other])
    assert ref.keys() == got.keys()
    for key, tile in got.items():
        assert tile.shape == (CFG.tile_px, CFG.tile_px, 3) and tile.dtype == np.uint8
        diff = np.abs(tile.astype(np.int16) - ref[key].astype(np.int16))
        assert diff.mean() < 1.5, (key, diff.mean())


def test_cell_lands_where_the_grid_says(scans):
    tiles = tiles_of(scans["0.5"])
    tile = tiles[(2, 1)]  # cell at (750, 450) µm: the centre of tile (2, 1)
    centre = tile[290:310, 290:310].astype(int)
    assert centre.mean(axis=(0, 1))[1] < 120  # dark green channel: stained
    assert np.abs(tile[20, 20].astype(int) - GLASS).max() <= 10


def test_partial_edge_tile_is_padded_white(scans):
    tile = tiles_of(scans["0.25"])[(4, 1)]  # covers 1200-1500 µm; the glass ends at 1350
    assert (tile[:, 310:] == 255).all()  # beyond the glass (150 µm = 300 px)
    assert np.abs(tile[:200, :290].astype(int) - GLASS).max() <= 10  # glass, above the cell


class ReadSpy:
    """Records which level and size each read asks for, reading through to the slide."""

    def __init__(self, slide: Slide, monkeypatch: pytest.MonkeyPatch):
        self.calls: list[tuple[int, int, int]] = []
        original = slide.read_rgba

        def read_rgba(level, x0, y0, w, h):
            self.calls.append((level, w, h))
            return original(level, x0, y0, w, h)

        monkeypatch.setattr(slide, "read_rgba", read_rgba)


@pytest.mark.parametrize(
    ("scan", "level", "read_px"),
    [
        ("0.25", 1, 600),  # level 1 is exactly 0.5 µm/px: read as is
        ("0.5", 0, 600),
        ("0.25-f4", 0, 1200),  # levels 0.25, 1.0: read level 0 and reduce by 2
        ("0.3", 0, 1000),  # level 1 is 0.6 µm/px, too coarse: read level 0, resample
    ],
)
def test_read_tile_reads_the_coarsest_level_fine_enough(scans, monkeypatch, scan, level, read_px):
    with open_slide(scans[scan]) as slide:
        spec = plan_tiles(slide, CFG).tiles[0]
        spy = ReadSpy(slide, monkeypatch)
        tile = read_tile(slide, spec, CFG)
    assert spec.level == level
    assert spy.calls == [(level, read_px, read_px)]
    assert tile.shape == (600, 600, 3)


def test_level_within_tolerance_of_the_target_is_used(tmp_path: Path):
    # a 0.2475 µm/px scanner: level 1 is 0.495 µm/px, 1% finer than 0.5: read it
    path = disc_slide(tmp_path / "s.svs", mpp=0.2475, size_um=(600, 600), discs=[(150, 150, 20)])
    with open_slide(path) as slide:
        spec = plan_tiles(slide, CFG).tiles[0]
        assert spec.level == 1
        assert read_tile(slide, spec, CFG).shape == (600, 600, 3)


def test_overlap_shrinks_the_stride(scans):
    cfg = TilingConfig(overlap_px=100)  # stride 500 px = 250 µm
    with open_slide(scans["0.5"]) as slide:
        p = plan_tiles(slide, cfg)
    assert (p.cols, p.rows) == (6, 5)
    assert {t.x0 for t in p.tiles} <= {500 * c for c in range(6)}


def test_blank_glass_has_no_tiles(tmp_path: Path):
    path = disc_slide(tmp_path / "blank.svs", mpp=0.5, size_um=(900, 900), discs=[])
    with open_slide(path) as slide, pytest.raises(NoForegroundError) as exc:
        plan_tiles(slide, CFG)
    assert str(exc.value).startswith("blank.svs: no cells found")


def test_scan_too_coarse_for_the_target_is_refused(tmp_path: Path):
    path = disc_slide(tmp_path / "lowmag.svs", mpp=1.0, size_um=(900, 900), discs=DISCS[:1])
    with open_slide(path) as slide, pytest.raises(TooCoarseError, match="coarser than the 0.5"):
        plan_tiles(slide, CFG)


def test_tiling_config_is_strict():
    assert (CFG.target_mpp, CFG.tile_px, CFG.overlap_px, CFG.mask_mpp) == (0.5, 600, 0, 8.0)
    assert CFG.tile_um == 300
    with pytest.raises(ValidationError):
        TilingConfig(tile_size=512)  # a typo is an error, not a silently ignored field
    with pytest.raises(ValidationError, match="overlap_px 600 must be below tile_px 600"):
        TilingConfig(overlap_px=600)
    assert TilingConfig.model_validate_json(CFG.model_dump_json()) == CFG


def test_tile_spec_round_trips_as_a_plain_row():
    spec = TileSpec(
        index=3, col=1, row=2, x0=600, y0=1200, w0=600, h0=600, level=0, fg_fraction=0.5
    )
    assert TileSpec(**spec.model_dump()) == spec
