"""Scanning a specimen into a pyramidal slide file: slide sizes, pixel counts, tile rendering.

The physical slide sizes and the scan geometry (microns to level-0 pixels) are shared by the
cohort, its ground truth and the progress count, so they live beside the one function that
scans: ``render_slide`` drives the renderer tile by tile through ``write_pyramid``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np

from smartccs.synth.profiles import CenterProfile
from smartccs.synth.render import Renderer
from smartccs.synth.specimen import Specimen
from smartccs.synth.writer import SlideFormat, write_pyramid

Size = Literal["tiny", "small", "medium", "large"]

SIZES_UM: dict[str, float] = {"tiny": 1000.0, "small": 3000.0, "medium": 8000.0, "large": 20000.0}
"""Physical side of a square slide scan per size (large = 80,000 px at 0.25 um/px)."""

MIN_LEVEL_PX = 1024
"""The pyramid stops at the first level whose longer side is at most this many pixels."""


def scan_size(width_um: float, height_um: float, mpp: float) -> tuple[int, int]:
    """Level-0 pixels of a scan of the given physical size."""
    return round(width_um / mpp), round(height_um / mpp)


def render_slide(
    specimen: Specimen,
    profile: CenterProfile,
    path: str | Path,
    *,
    mpp: float,
    fmt: SlideFormat,
    on_tile: Callable[[], None] | None = None,
) -> None:
    """Scan ``specimen`` with ``profile``'s optics at ``mpp`` into a pyramidal slide file.

    Every level is rendered from the specimen itself (not downsampled from the level above), so
    memory stays at a few tiles and every level is as sharp as a scanner's.
    """
    width, height = scan_size(specimen.width_um, specimen.height_um, mpp)
    renderer = Renderer(specimen, profile, specimen.seed)

    def render(level: int, downsample: float, x: int, y: int, w: int, h: int) -> np.ndarray:
        p = downsample * mpp
        tile = renderer.region(x * p, y * p, w, h, p)
        if on_tile is not None:
            on_tile()
        return tile

    write_pyramid(
        path,
        width=width,
        height=height,
        mpp=mpp,
        fmt=fmt,
        render=render,
        tile_size=profile.scanner.tile_size,
        jpeg_quality=profile.scanner.jpeg_quality,
        pyramid_factor=profile.scanner.pyramid_factor,
        min_level_px=MIN_LEVEL_PX,
    )
