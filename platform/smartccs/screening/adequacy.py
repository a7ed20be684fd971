"""Specimen adequacy: squamous cells counted from the pixels, against Bethesda's minimum.

The Bethesda System calls a liquid-based preparation satisfactory when it holds at least
5,000 well-visualised squamous cells (conventional smears 8,000-12,000). Two things are needed:
a count, and the minimum that applies to what was imaged.

**The minimum** is Bethesda's, for a whole preparation spot (20 mm ThinPrep, 13 mm SurePath),
pro-rated when the image covers less of the spot (a synthetic slide of 1-3 mm):
``min_squamous x min(1, scanned area / spot area)``. The scanned area, not the stained area:
a sparse, hypocellular smear must not lower its own bar.

The count is ``screening.squamous``.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

from smartccs.taxonomy import BETHESDA_MIN_SQUAMOUS, THINPREP_SPOT_MM, preparation_share


class AdequacyConfig(BaseModel):
    """Bethesda's adequacy rule, pro-rated to the part of the preparation that was imaged."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_squamous: int = Field(
        default=BETHESDA_MIN_SQUAMOUS,
        ge=0,
        description="well-visualised squamous cells a whole preparation needs (Bethesda, "
        "liquid-based; 8000 for conventional smears); 0 turns the check off",
    )
    preparation_diameter_mm: float = Field(
        default=THINPREP_SPOT_MM,
        gt=0,
        description="diameter of the preparation spot the minimum is for (ThinPrep 20 mm, "
        "SurePath 13 mm); a slide scanned over less of it needs proportionally fewer cells",
    )


def required_squamous(cfg: AdequacyConfig, scanned_mm2: float | None) -> int:
    """The minimum for a slide whose image covers ``scanned_mm2`` (None or NaN: unknown, the
    whole minimum). Bethesda's count is for the whole spot, and a preparation spreads its cells
    over it, so an image of a fraction of the spot needs that fraction of the cells."""
    if cfg.min_squamous == 0:
        return 0
    share = 1.0
    if scanned_mm2 is not None and math.isfinite(scanned_mm2) and scanned_mm2 > 0:
        share = preparation_share(scanned_mm2, cfg.preparation_diameter_mm)
    return max(1, math.ceil(cfg.min_squamous * share))
