"""The physical scene of one synthetic Pap slide: cells in microns, before any scanner sees it.

A specimen is drawn once per slide and rendered at any resolution, so two scans of one
specimen (say 0.25 and 0.5 um/px) show the same cells at the same places; that is what lets
tests check the physical tile grid. Cells are one structured numpy array plus a grid index, so
the scene is the only per-slide state and a region query touches only nearby cells.

This module composes a slide: the normal mix, how many abnormal cells of which classes, and
where they go. What a cell looks like is ``morphology`` and ``cell_drawing``, how cells group is
``placement``, and outlines are ``contour``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from smartccs.errors import CCSError
from smartccs.synth.cell_geometry import fill_box_and_reach
from smartccs.synth.cell_table import CELL_DTYPE, CELL_KINDS, NORMAL_KINDS
from smartccs.synth.grid_index import GridIndex
from smartccs.synth.placement import GroupCounter, place_kind
from smartccs.synth.prep_area import PrepArea
from smartccs.synth.profiles import CenterProfile
from smartccs.taxonomy import SEVERITY, slide_grade

NORMAL_MIX = np.array([0.32, 0.43, 0.07, 0.12, 0.06])
"""Mean share of each normal kind (superficial .. debris); each slide draws its own mix."""

COMPANIONS: dict[str, tuple[str, ...]] = {
    "ASC-US": (),
    "LSIL": ("ASC-US",),
    "ASC-H": ("ASC-US",),
    "HSIL": ("LSIL", "ASC-H", "ASC-US"),
    "SCC": ("HSIL", "ASC-H"),
    "AGC": ("ASC-US",),
}
"""Less severe findings that often accompany a grade's own cells on the same slide."""

GRADE_SHARE = 0.75
"""Expected share of an abnormal slide's abnormal cells that belong to the slide's grade."""


@dataclass(frozen=True)
class Specimen:
    """One slide's cells in microns; its grade is the most severe class present."""

    width_um: float
    height_um: float
    seed: int
    cells: np.ndarray  # CELL_DTYPE, one row per cell, row number = cell id
    index: GridIndex = field(repr=False)

    @classmethod
    def from_cells(
        cls, width_um: float, height_um: float, cells: np.ndarray, seed: int
    ) -> Specimen:
        """Finish drawn cells (reach, ground-truth boxes) and index them."""
        cells = np.ascontiguousarray(cells, dtype=CELL_DTYPE)
        fill_box_and_reach(cells)
        index = GridIndex(cells["x"], cells["y"], cells["reach"], bucket_um=128.0)
        return cls(float(width_um), float(height_um), int(seed), cells, index)

    @property
    def grade(self) -> str:
        """Ground-truth slide grade: the most severe class among the cells."""
        return slide_grade(set(self.classes()))

    def classes(self) -> list[str]:
        """Ground-truth class name per cell."""
        names = np.array(CELL_KINDS)
        return names[self.cells["kind"]].tolist()

    def query(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """Sorted ids of cells whose drawing may touch the rectangle (um)."""
        idx = self.index.candidates(x0, y0, x1, y1)
        c = self.cells[idx]
        r = c["reach"]
        hit = (c["x"] - r < x1) & (c["x"] + r > x0) & (c["y"] - r < y1) & (c["y"] + r > y0)
        return np.sort(idx[hit])


def make_specimen(
    rng: np.random.Generator, width_um: float, height_um: float, profile: CenterProfile, grade: str
) -> Specimen:
    """Draw a slide of ``grade``: a normal background plus, if abnormal, its findings."""
    if grade not in SEVERITY:
        raise CCSError(f"unknown grade {grade!r}; expected one of {', '.join(SEVERITY)}")
    seed = int(rng.integers(2**62))
    area = PrepArea.draw(rng, width_um, height_um)
    groups = GroupCounter()
    parts: list[np.ndarray] = []

    mix = rng.dirichlet(NORMAL_MIX * 25.0)
    n_normal = rng.poisson(profile.cell_density_per_mm2 * area.area_mm2)
    for kind, n in zip(NORMAL_KINDS, rng.multinomial(n_normal, mix), strict=True):
        parts.append(place_kind(rng, kind, int(n), area, groups))

    if grade != "NILM":
        lo, hi = profile.abnormal_density_per_mm2
        n_abnormal = rng.poisson(rng.uniform(lo, hi) * area.area_mm2)
        for kind, n in _abnormal_counts(rng, grade, n_abnormal).items():
            parts.append(place_kind(rng, kind, n, area, groups))

    specimen = Specimen.from_cells(width_um, height_um, np.concatenate(parts), seed)
    assert specimen.grade == grade, (specimen.grade, grade)
    return specimen


def cells_in_disc(
    rng: np.random.Generator, kind: str, n: int, cx: float, cy: float, radius_um: float
) -> np.ndarray:
    """``n`` cells of ``kind`` centred in a disc, grouped the way that kind groups."""
    return place_kind(rng, kind, n, PrepArea.disc(cx, cy, radius_um), GroupCounter())


def _abnormal_counts(rng: np.random.Generator, grade: str, n: int) -> dict[str, int]:
    """Abnormal cells per class: mostly the grade's own, the rest milder companions."""
    companions = COMPANIONS[grade]
    n = max(n, 2)
    own = max(2, int(rng.binomial(n, GRADE_SHARE if companions else 1.0)))
    counts = {grade: own}
    if companions and n > own:
        shares = rng.multinomial(n - own, np.full(len(companions), 1.0 / len(companions)))
        for kind, k in zip(companions, shares, strict=True):
            if k:
                counts[kind] = int(k)
    return counts
