"""Per-tile quality numbers, cheap enough to compute on every tile the detector sees.

Out-of-focus regions and near-empty tiles are the two ways a cytology scan fails locally;
both are worth recording per tile (and aggregating per slide) so that a bad scan shows up in
the results instead of as a silent miss. Everything runs on strided views of every 8th row
of the tile, so it touches an eighth of the tile's memory and costs a few percent of reading it.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from smartccs.slide.foreground import DEFAULT_FOREGROUND, ForegroundConfig, pixel_features

ROW_STEP = 8
"""QC reads every 8th row: on a freshly read tile, memory traffic is most of the cost."""

STATS_STEP = 8
"""Colour statistics use every 8th pixel of those rows: 5,600 samples of a 600 px tile."""

FOCUS_STEP = 4
"""Focus uses every 4th pixel of those rows (no averaging, which would itself blur): blur of
more than about a pixel at 0.5 µm/px still shows as a drop of the second difference."""


class TileQC(BaseModel):
    """Quality of one tile."""

    model_config = ConfigDict(frozen=True)

    background_fraction: float = Field(description="fraction of the tile that is bare glass")
    blur: float | None = Field(
        description="variance of the second difference of the green channel along rows, over "
        "the cells (grey levels², every 4th pixel); low means out of focus; None for a tile "
        "with no cells"
    )
    mean_od: float = Field(description="mean optical density: stain and cell amount")


def tile_qc(
    rgb: np.ndarray,
    *,
    saturation_threshold: float | None = None,
    od_threshold: float | None = None,
    config: ForegroundConfig = DEFAULT_FOREGROUND,
) -> TileQC:
    """Quality numbers of an RGB tile.

    Glass is whatever falls below the slide's own foreground thresholds (from its plan), so a
    center whose glass scans cream or grey is not counted as covered in cells; without them,
    the floors of ``config``. Focus is the Laplacian along the rows only: the sampled rows
    are 8 px apart, too far for a vertical difference, and cells have edges in every direction.
    """
    s_thr = config.saturation_floor if saturation_threshold is None else saturation_threshold
    od_thr = config.od_floor if od_threshold is None else od_threshold
    rows = rgb[::ROW_STEP]
    sat, od = pixel_features(rows[:, ::STATS_STEP])
    cells = (sat > s_thr) | (od > od_thr)
    grey = rows[:, ::FOCUS_STEP, 1].astype(np.float32)  # green: both stains absorb it
    second = 2 * grey[:, 1:-1] - grey[:, :-2] - grey[:, 2:]
    on_cells = np.repeat(cells, STATS_STEP // FOCUS_STEP, 1)[:, 1 : grey.shape[1] - 1]
    focus = second[on_cells]
    return TileQC(
        background_fraction=1.0 - float(cells.mean()),
        blur=float(focus.var()) if focus.size else None,
        mean_od=float(od.mean()),
    )
