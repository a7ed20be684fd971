"""Specimen adequacy: the squamous count tracks the truth, and the minimum is Bethesda's.

Real parts: slides the synthetic generator writes (their ground truth read from what the
cohort writes, ``ground_truth/slides.parquet``), cells rendered by the same renderer, the
platform's own tiling and tile reader, and ``slides_table`` turning bags into rows.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from toy_models import stand_in_classifier

from smartccs.models.detector import SQUAMOUS_KINDS
from smartccs.screening.adequacy import AdequacyConfig, required_squamous
from smartccs.screening.bags import SlideBag
from smartccs.screening.slides import slides_table
from smartccs.screening.squamous import count_squamous, label, nucleus_cores
from smartccs.slide.reader import open_slide
from smartccs.slide.tiling import TilingConfig, plan_tiles, read_tile
from smartccs.synth.cell_drawing import draw_cells
from smartccs.synth.cohort import generate_cohort
from smartccs.synth.profiles import load_profiles
from smartccs.synth.render import render_region
from smartccs.synth.specimen import Specimen

TILING = TilingConfig(target_mpp=0.5, tile_px=256)  # the demo detector's grid
PROFILES = {p.name: p for p in load_profiles()}


def _truth(center_dir: Path) -> dict[str, int]:
    """Normal squamous cells per slide, from the ground truth the cohort writes."""
    rows = pq.read_table(center_dir / "ground_truth" / "slides.parquet").to_pylist()
    return {r["slide_id"]: sum(r[f"n_{k}"] for k in SQUAMOUS_KINDS) for r in rows}


def test_the_count_tracks_the_truth_on_generated_slides(tiny_cohort: Path):
    """Every slide of the tiny cohort: the count over the tiles the screening engine reads is
    within half of the truth (the issue's bound; about 10% in practice, docs/screening.md)."""
    errors = {}
    for center_dir in sorted(p.parent for p in tiny_cohort.glob("*/manifest.json")):
        for slide_id, truth in _truth(center_dir).items():
            slide = open_slide(next((center_dir / "slides").glob(f"{slide_id}.*")))
            plan = plan_tiles(slide, TILING)
            tiles = np.stack([read_tile(slide, t, TILING) for t in plan.tiles])
            estimate = int(count_squamous(tiles, TILING.target_mpp).sum())
            errors[slide_id] = (estimate - truth) / truth
    assert len(errors) == 4 and all(abs(e) <= 0.5 for e in errors.values()), errors


def test_a_hypocellular_slide_is_below_the_prorated_minimum(tmp_path: Path):
    """A preparation at 8 cells/mm² (Bethesda's minimum is 5,000 per 314 mm², 16/mm²) counts
    under the minimum its 1 mm² needs; the built-in densities (240-400/mm²) count far above."""
    profiles = tmp_path / "sparse.yaml"
    profiles.write_text(
        "centers:\n  - {name: sparse, kind: internal, cell_density_per_mm2: 8, "
        "prevalence: {NILM: 1.0}}\n"
    )
    generate_cohort(tmp_path / "c", profiles=profiles, slides_per_center=1, size="tiny", seed=0,
                    workers=1, progress=False)  # fmt: skip
    slide = open_slide(next((tmp_path / "c" / "sparse" / "slides").glob("*")))
    tiles = np.stack([read_tile(slide, t, TILING) for t in plan_tiles(slide, TILING).tiles])
    count = int(count_squamous(tiles, TILING.target_mpp).sum())
    area = slide.info.width * slide.info.height * slide.info.mpp**2 / 1e6
    assert count < required_squamous(AdequacyConfig(), area) == 16, count


def _cells(kind: str, n: int, pitch_um: float, seed: int = 0) -> tuple[Specimen, float]:
    """``n`` cells of one kind on a square grid ``pitch_um`` apart (no overlaps)."""
    side = math.ceil(math.sqrt(n))
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n] + 0.5
    cells = draw_cells(np.random.default_rng(seed), kind, grid * pitch_um)
    extent = side * pitch_um
    return Specimen.from_cells(extent, extent, cells, seed), extent


@pytest.mark.parametrize("center", ["int-a", "ext-c"])
def test_one_count_per_squamous_nucleus_none_for_neutrophils_or_atypia(center: str):
    """Rendered as a center's scanner shows them: intermediate and superficial cells count one
    each; most neutrophils (lobed nuclei) and every ASC-US cell (a nucleus 2.5-3 times the
    intermediate cell's) do not. ext-c: a 0.2 µm/px scanner, heavy stain, poor focus."""
    profile = PROFILES[center]
    mpp = profile.scanner.mpp
    got = {}
    for kind, n, pitch in (("intermediate", 16, 60.0), ("superficial", 16, 64.0),
                           ("inflammatory", 25, 20.0), ("ASC-US", 9, 60.0)):  # fmt: skip
        specimen, extent = _cells(kind, n, pitch)
        side = round(extent / mpp)
        image = render_region(specimen, profile, 0.0, 0.0, side, side, mpp, seed=1)
        got[kind] = int(count_squamous(image[None], mpp).sum())
    assert 14 <= got["intermediate"] <= 16 and 14 <= got["superficial"] <= 16, got
    assert got["inflammatory"] <= 25 * 0.4 and got["ASC-US"] == 0, got


def test_a_nucleus_on_a_tile_border_counts_once():
    """Nuclei centred on the line between two tiles: the tile they touch on its right (or
    bottom) edge counts them, the one they touch on its left (or top) edge does not."""
    profile, mpp = PROFILES["int-a"], 0.5
    cells = draw_cells(np.random.default_rng(3), "intermediate", np.array(
        [[64.0, 20.0], [64.0, 64.0], [64.0, 108.0], [20.0, 64.0], [108.0, 64.0]]
    ))  # fmt: skip
    cells["nuc_dx"], cells["nuc_dy"] = 0.0, 0.0  # nuclei on x = 64 µm and y = 64 µm
    image = render_region(Specimen.from_cells(128.0, 128.0, cells, 3), profile, 0, 0, 256, 256,
                          mpp, seed=3)  # fmt: skip
    whole = int(count_squamous(image[None], mpp).sum())
    halves = count_squamous(np.stack([image[:, :128], image[:, 128:]]), mpp)
    rows = count_squamous(np.stack([image[:128], image[128:]]), mpp)
    quarters = [image[:128, :128], image[:128, 128:], image[128:, :128], image[128:, 128:]]
    assert whole == 5
    assert halves.sum() == rows.sum() == count_squamous(np.stack(quarters), mpp).sum() == 5
    assert halves.tolist() == [4, 1], "the three on the border belong to the left tile"


def test_cores_measure_size_in_microns_at_any_pixel_size():
    """The same cells scanned at 0.25 and 0.5 µm/px give the same nuclear areas (FWHM)."""
    specimen, extent = _cells("intermediate", 9, 60.0)
    areas = {}
    for mpp in (0.25, 0.5):
        side = round(extent / mpp)
        image = render_region(specimen, PROFILES["int-a"], 0, 0, side, side, mpp, seed=0)
        areas[mpp] = np.sort(nucleus_cores(image[None], mpp)["area_um2"])[-9:]
    assert np.allclose(areas[0.25], areas[0.5], rtol=0.25), areas
    assert 25 < np.median(areas[0.5]) < 45, "the intermediate nucleus: about 35 µm²"


def test_blank_and_empty_input_count_nothing():
    assert count_squamous(np.zeros((0, 64, 64, 3), np.uint8), 0.5).tolist() == []
    glass = np.full((2, 64, 64, 3), 236, np.uint8)
    assert count_squamous(glass, 0.5).tolist() == [0, 0]


def test_label_finds_8_connected_components_per_image():
    mask = np.zeros((2, 5, 5), bool)
    mask[0, 0, 0] = mask[0, 1, 1] = True  # diagonal: one component
    mask[0, 3:5, 3:5] = True
    mask[1, 0, 0] = True  # the same place in the next image: its own component
    comp, flat = label(mask)
    assert len(flat) == 7 and comp.max() == 2
    by_pixel = dict(zip(flat.tolist(), comp.tolist(), strict=True))
    assert by_pixel[0] == by_pixel[6] != by_pixel[18] != by_pixel[25]


def test_the_minimum_is_bethesda_s_prorated_to_the_scanned_area():
    bethesda = AdequacyConfig()
    spot = math.pi * 10.0**2  # a 20 mm ThinPrep spot, 314 mm²
    assert (bethesda.min_squamous, bethesda.preparation_diameter_mm) == (5000, 20.0)
    assert required_squamous(bethesda, spot) == 5000
    assert required_squamous(bethesda, 25.0 * 75.0) == 5000, "a whole glass slide: the spot"
    assert required_squamous(bethesda, None) == required_squamous(bethesda, math.nan) == 5000
    assert required_squamous(bethesda, 1.0) == 16, "a 1 mm synthetic tiny slide"
    assert required_squamous(bethesda, 9.0) == 144, "a 3 mm small slide"
    surepath = AdequacyConfig(preparation_diameter_mm=13.0)
    assert required_squamous(surepath, 1.0) == math.ceil(5000 / (math.pi * 6.5**2)) == 38
    assert required_squamous(AdequacyConfig(min_squamous=0), 1.0) == 0, "0 turns it off"
    assert required_squamous(AdequacyConfig(min_squamous=1), 1e-6) == 1


def _bag(slide_id: str, squamous: int, area_mm2: float) -> SlideBag:
    k = 2
    return SlideBag(
        "c", "b", slide_id, np.zeros((6, k, 4), np.float32), np.zeros((6, k), np.float32),
        np.full((6, k, 4), np.nan), np.zeros((6, k), bool), n_tiles=4, tiles_read=4,
        n_squamous=squamous, slide_area_mm2=area_mm2,
    )  # fmt: skip


def test_a_slide_row_is_adequate_by_the_prorated_minimum():
    classifier = stand_in_classifier()
    bags = [_bag("tiny-ok", 150, 1.0), _bag("tiny-sparse", 10, 1.0), _bag("whole", 4000, 400.0)]
    table = slides_table(
        bags, np.full((3, 7), 1 / 7, np.float32), run_id="r", classifier=classifier,
        adequacy=AdequacyConfig(),
    )  # fmt: skip
    ok, sparse, whole = table.to_pylist()
    assert ok["status"] == "screened" and ok["adequate"] and ok["n_squamous"] == 150
    assert sparse["status"] == "inadequate" and sparse["adequate"] is False
    assert (
        "fewer than 16 (5000 per 20 mm preparation, pro-rated to the 1 mm² scanned)"
        in (sparse["error"])
    )
    assert whole["status"] == "inadequate"
    assert "fewer than 5000 (the minimum for a whole 20 mm preparation)" in whole["error"]
