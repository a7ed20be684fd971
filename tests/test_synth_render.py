"""Specimens and their rendering: grades, spatial index, determinism, physical consistency."""

from __future__ import annotations

import numpy as np
import pytest

from smartccs.synth.cell_table import CELL_KINDS
from smartccs.synth.profiles import CenterProfile, load_profiles
from smartccs.synth.render import render_region
from smartccs.synth.specimen import Specimen, cells_in_disc, make_specimen
from smartccs.taxonomy import ABNORMAL_CLASSES, GRADES, SEVERITY, slide_grade


@pytest.fixture(scope="module")
def profile() -> CenterProfile:
    return load_profiles(None)[0]


@pytest.fixture(scope="module")
def hsil(profile: CenterProfile) -> Specimen:
    return make_specimen(np.random.default_rng(5), 600.0, 600.0, profile, "HSIL")


def _grey(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float64).mean(axis=2)


@pytest.mark.parametrize("grade", GRADES)
def test_specimen_grade_is_most_severe_class_present(profile: CenterProfile, grade: str) -> None:
    spec = make_specimen(np.random.default_rng(1), 1000.0, 1000.0, profile, grade)
    classes = spec.classes()
    assert slide_grade(classes) == grade == spec.grade
    abnormal = [c for c in classes if c in ABNORMAL_CLASSES]
    assert all(SEVERITY[c] <= SEVERITY[grade] for c in abnormal)
    if grade != "NILM":
        assert classes.count(grade) >= 2
    assert {"superficial", "intermediate"} <= set(classes)


def test_cells_and_boxes_lie_inside_the_slide(hsil: Specimen) -> None:
    c = hsil.cells
    box = c["box"]
    assert np.all(
        (c["x"] > 0) & (c["x"] < hsil.width_um) & (c["y"] > 0) & (c["y"] < hsil.height_um)
    )
    assert np.all((box[:, 0] <= c["x"]) & (c["x"] <= box[:, 2]))
    assert np.all((box[:, 1] <= c["y"]) & (c["y"] <= box[:, 3]))


def test_region_query_finds_exactly_the_cells_that_reach_it(hsil: Specimen) -> None:
    c = hsil.cells
    rng = np.random.default_rng(0)
    for _ in range(20):
        x0, y0 = rng.uniform(-50, 600, 2)
        x1, y1 = x0 + rng.uniform(1, 200), y0 + rng.uniform(1, 200)
        r = c["reach"]
        brute = np.flatnonzero(
            (c["x"] - r < x1) & (c["x"] + r > x0) & (c["y"] - r < y1) & (c["y"] + r > y0)
        )
        assert np.array_equal(hsil.query(x0, y0, x1, y1), brute)


def test_same_region_renders_identically_whatever_was_rendered_before(
    hsil: Specimen, profile: CenterProfile
) -> None:
    a = render_region(hsil, profile, 200.0, 200.0, 256, 256, 0.25, seed=3)
    render_region(hsil, profile, 264.0, 200.0, 256, 256, 0.25, seed=3)
    b = render_region(hsil, profile, 200.0, 200.0, 256, 256, 0.25, seed=3)
    assert a.dtype == np.uint8 and a.shape == (256, 256, 3)
    assert np.array_equal(a, b)
    other = render_region(hsil, profile, 200.0, 200.0, 256, 256, 0.25, seed=4)
    assert not np.array_equal(a, other)  # the seed moves the sensor noise


def test_tiles_stitch_into_the_same_picture_as_one_region(
    hsil: Specimen, profile: CenterProfile
) -> None:
    quiet = profile.model_copy(update={"noise_sigma": 0.0})
    whole = render_region(hsil, quiet, 150.0, 150.0, 512, 512, 0.25, seed=0)
    stitched = np.zeros_like(whole)
    for i in range(2):  # 256 px at 0.25 um/px = 64 um per tile
        for j in range(2):
            tile = render_region(hsil, quiet, 150.0 + 64 * i, 150.0 + 64 * j, 256, 256, 0.25, 0)
            stitched[256 * j : 256 * (j + 1), 256 * i : 256 * (i + 1)] = tile
    assert np.abs(whole.astype(int) - stitched).max() <= 1
    assert _grey(whole).std() > 10  # there are cells in it


def test_half_resolution_scan_is_the_same_picture(hsil: Specimen, profile: CenterProfile) -> None:
    fine = render_region(hsil, profile, 100.0, 100.0, 1600, 1600, 0.25, seed=1)
    coarse = render_region(hsil, profile, 100.0, 100.0, 800, 800, 0.5, seed=1)
    down = fine.astype(np.float64).reshape(800, 2, 800, 2, 3).mean(axis=(1, 3))
    diff = np.abs(down - coarse)
    assert diff.mean() < 2.5
    corr = np.corrcoef(_grey(down).ravel(), _grey(coarse).ravel())[0, 1]
    assert corr > 0.97


def test_empty_glass_is_bright_background_with_noise(profile: CenterProfile) -> None:
    spec = Specimen.from_cells(
        500.0, 500.0, cells_in_disc(np.random.default_rng(0), "HSIL", 0, 0, 0, 1), 0
    )
    img = render_region(spec, profile, 0.0, 0.0, 256, 256, 0.25, seed=0)
    mean = img.reshape(-1, 3).mean(axis=0)
    assert np.allclose(mean, profile.background, atol=1.5)
    assert 0.5 < img[..., 1].std() < 4 * profile.noise_sigma


@pytest.mark.parametrize("kind", CELL_KINDS)
def test_each_class_is_drawn_where_its_box_says(profile: CenterProfile, kind: str) -> None:
    rng = np.random.default_rng(2)
    spec = Specimen.from_cells(120.0, 120.0, cells_in_disc(rng, kind, 1, 60.0, 60.0, 0.0), 0)
    img = render_region(spec, profile, 0.0, 0.0, 480, 480, 0.25, seed=0)
    od = -np.log(np.maximum(_grey(img), 1.0) / np.mean(profile.background))
    x0, y0, x1, y1 = (spec.cells["box"][0] / 0.25).round().astype(int)
    inside = od[y0:y1, x0:x1]
    outside = od.copy()
    outside[max(0, y0 - 8) : y1 + 8, max(0, x0 - 8) : x1 + 8] = np.nan
    assert np.nanmax(np.abs(outside)) < 0.1  # nothing drawn outside the box
    assert inside.mean() > 0.04  # the cell is stained
    if kind in ABNORMAL_CLASSES:
        # hyperchromatic nuclei: far darker than anything on the glass
        assert np.percentile(inside, 99.5) > 0.6


def test_abnormal_nuclei_are_larger_than_intermediate_nuclei(profile: CenterProfile) -> None:
    rng = np.random.default_rng(0)
    area = {
        k: np.mean(cells_in_disc(rng, k, 50, 500, 500, 300)["nuc_radius"] ** 2)
        for k in ("intermediate", "ASC-US", "LSIL")
    }
    assert 2.2 < area["ASC-US"] / area["intermediate"] < 3.3
    assert area["LSIL"] / area["intermediate"] > 3.0
    hsil = cells_in_disc(rng, "HSIL", 50, 500, 500, 300)
    assert np.all(hsil["nuc_radius"] / hsil["radius"] >= 0.7)  # very high N/C
