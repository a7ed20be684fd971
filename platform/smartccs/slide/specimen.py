"""The specimen guard: is this glass a cervical cytology preparation at all?

The screening models only know Pap-stained cells on glass. A histology section, blank glass or
a preparation with (almost) no cells would still be tiled and scored, and its score read as a
result: a real H&E section was once called ASC-US, another NILM. So before any tile is read,
the planner's own foreground mask (the low-resolution level it already reads, at
``TilingConfig.mask_mpp``) is measured, and a slide that is plainly not cytology is rejected
with what was measured. Every rule is in physical units and rests on what a Pap preparation
is, never on the synthetic generator's numbers:

* a liquid-based preparation is a spot of dispersed cells (ThinPrep 20 mm across, SurePath
  13 mm) of which Bethesda requires at least 5,000 well-preserved squamous cells;
* squamous cells are 20-25 µm (parabasal) to 40-60 µm (superficial) across and lie as a
  near-monolayer, so almost every stained point is within one cell of bare glass;
* a tissue section is one contiguous piece of stained tissue, millimetres across, in which
  most stained points are far from any glass.

The guard only rejects what is plainly not cytology. Whether a cytology preparation has enough
well-preserved squamous cells is the adequacy count's call (``screening.slides``), made on the
cells the detector sees, which stained area alone cannot tell from debris, blood or mucus.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from smartccs.slide.foreground import ForegroundMask
from smartccs.taxonomy import BETHESDA_MIN_SQUAMOUS, preparation_share

ALMOST_NONE = 0.10
"""A slide is "almost no cells" below a tenth of the Bethesda minimum for its area: an order
of magnitude below the adequacy line, so that everything between is left to the adequacy
count, and only a preparation with essentially nothing on it is rejected here."""

SMALLEST_SQUAMOUS_UM2 = 400.0
"""Stained area of the smallest squamous cell, a parabasal cell about 20-25 µm across. Dividing
the slide's stained area by it gives the most cells that area could possibly be, so the
"almost no cells" rule never rejects a slide for having fewer, larger cells."""

SOLID_SIDE_UM = 100.0
"""A square of stained glass this wide is larger than any single squamous cell (40-60 µm):
it lies inside a tissue section, or where cells pile up (a crowded group, a thick sheet)."""

TISSUE_SOLID_FRACTION = 0.5
"""A section when most of its stained area is solid: in a Pap preparation the cells lie
dispersed as a near-monolayer, and crowded groups (HSIL groups, endocervical sheets, AGC) are
a minority of its cells; in a section, tissue is continuous and glass is only at its edges,
folds and lumens (the public CMU-1 H&E region measures 0.68)."""

TISSUE_MIN_MM2 = 0.1
"""...and that solid area is more than the largest crowded group a Pap preparation holds
(about 300 µm across, 0.07 mm²), so that one thick cluster alone is never called tissue."""

Kind = Literal["cytology", "not_cytology"]
Finding = Literal["blank_glass", "tissue_section", "too_few_cells"]


class Specimen(BaseModel):
    """What the glass holds, as measured on the planner's foreground mask."""

    model_config = ConfigDict(frozen=True)

    kind: Kind = Field(description="cytology, or not_cytology: rejected before screening")
    finding: Finding | None = Field(default=None, description="why not cytology; None if it is")
    reason: str | None = Field(default=None, description="the finding, with what was measured")
    mask_mpp: float = Field(description="µm per pixel of the mask that was measured")
    glass_mm2: float = Field(description="area of the scanned glass")
    stained_mm2: float = Field(description="area of stained objects (cells, tissue, debris)")
    stained_fraction: float = Field(description="stained_mm2 / glass_mm2")
    cells_at_most: int = Field(
        description=f"stained area / {SMALLEST_SQUAMOUS_UM2:g} µm² (the smallest squamous cell)"
    )
    cells_floor: int = Field(
        description=f"{ALMOST_NONE:.0%} of Bethesda's {BETHESDA_MIN_SQUAMOUS} for this much glass"
    )
    solid_um: float = Field(description="side of the stained square that counts as solid")
    solid_mm2: float = Field(description="stained area inside fully stained squares")
    solid_fraction: float = Field(description="solid_mm2 / stained_mm2")


def assess_specimen(fg: ForegroundMask) -> Specimen:
    """Measure a slide's foreground mask and say whether it is a cytology preparation.

    Rules in order: no stained object at all is blank glass; a stained area that is mostly
    solid over more than any cell group is a tissue section; a stained area that could not
    hold a tenth of Bethesda's minimum, even as the smallest squamous cells, is too few cells.
    """
    stained = fg.mask if fg.stained is None else fg.stained
    px_mm2 = (fg.mpp / 1000.0) ** 2
    glass = stained.size * px_mm2
    n_stained = int(stained.sum())
    area = n_stained * px_mm2
    radius = max(1, round((SOLID_SIDE_UM / fg.mpp - 1) / 2))
    solid_um = (2 * radius + 1) * fg.mpp
    solid = int(_open(stained, radius).sum()) if n_stained else 0
    solid_mm2 = solid * px_mm2
    solid_fraction = solid / n_stained if n_stained else 0.0
    at_most = math.floor(area * 1e6 / SMALLEST_SQUAMOUS_UM2)
    share = preparation_share(glass)
    floor = math.ceil(ALMOST_NONE * BETHESDA_MIN_SQUAMOUS * share)
    finding: Finding | None = None
    reason: str | None = None
    if not n_stained:
        finding = "blank_glass"
        reason = f"blank glass: no stained object on {glass:.2f} mm² of glass"
    elif solid_fraction >= TISSUE_SOLID_FRACTION and solid_mm2 >= TISSUE_MIN_MM2:
        finding = "tissue_section"
        reason = (
            f"a tissue section, not a cytology preparation: {solid_fraction:.0%} of the "
            f"stained area ({solid_mm2:.2f} of {area:.2f} mm²) is solid over {solid_um:.0f} µm "
            "squares, wider than any cell"
        )
    elif at_most < floor:
        finding = "too_few_cells"
        reason = (
            f"almost no cells: the {area * 1e6:.0f} µm² stained on {glass:.2f} mm² of glass "
            f"is at most {at_most} cells of {SMALLEST_SQUAMOUS_UM2:g} µm², below the {floor} "
            f"that are {ALMOST_NONE:.0%} of Bethesda's {BETHESDA_MIN_SQUAMOUS} pro-rated to "
            "that much glass"
        )
    return Specimen(
        kind="cytology" if finding is None else "not_cytology",
        finding=finding,
        reason=reason,
        mask_mpp=fg.mpp,
        glass_mm2=round(glass, 4),
        stained_mm2=round(area, 6),
        stained_fraction=round(n_stained / stained.size, 4) if stained.size else 0.0,
        cells_at_most=at_most,
        cells_floor=floor,
        solid_um=solid_um,
        solid_mm2=round(solid_mm2, 6),
        solid_fraction=round(solid_fraction, 4),
    )


def _open(mask: np.ndarray, radius: int) -> np.ndarray:
    """Morphological opening by a (2·radius+1)² square: the stained pixels that lie inside a
    fully stained square. Beyond the slide's edge is glass, as it is for the tiles."""
    return _grow(_shrink(mask, radius), radius)


def _shrink(mask: np.ndarray, radius: int) -> np.ndarray:
    out = mask
    for axis in (0, 1):
        src, out = out, out.copy()
        n = src.shape[axis]
        for k in range(1, min(radius, n - 1) + 1):
            out[_cut(axis, k, n)] &= src[_cut(axis, 0, n - k)]
            out[_cut(axis, 0, n - k)] &= src[_cut(axis, k, n)]
        out[_cut(axis, 0, min(radius, n))] = False  # glass beyond the edge
        out[_cut(axis, max(n - radius, 0), n)] = False
    return out


def _grow(mask: np.ndarray, radius: int) -> np.ndarray:
    out = mask
    for axis in (0, 1):
        src, out = out, out.copy()
        n = src.shape[axis]
        for k in range(1, min(radius, n - 1) + 1):
            out[_cut(axis, k, n)] |= src[_cut(axis, 0, n - k)]
            out[_cut(axis, 0, n - k)] |= src[_cut(axis, k, n)]
    return out


def _cut(axis: int, start: int, stop: int) -> tuple[slice, slice]:
    """Rows (axis 0) or columns (axis 1) ``start:stop`` of a 2-D array."""
    return (slice(start, stop), slice(None)) if axis == 0 else (slice(None), slice(start, stop))
