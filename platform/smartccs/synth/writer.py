"""Pyramidal tiled-TIFF writer that produces what scanners produce, one tile at a time.

Levels are separate pages (OpenSlide ignores SubIFDs), tiles are JPEG in YCbCr like vendor
files, resolution tags are in centimetres, and an Aperio ImageDescription makes ``.svs`` files
open as vendor ``aperio``. Pixels come from a callback per tile, so peak memory is a few tiles
whatever the slide size. No timestamps are written: the same pixels give the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import tifffile

SlideFormat = Literal["svs", "tiff"]

TileRenderer = Callable[[int, float, int, int, int, int], np.ndarray]
"""``render(level, downsample, x, y, w, h)`` -> uint8 ``(h, w, 3)`` pixels of that level."""

SOFTWARE = "SmartCCS synth"


def level_dimensions(
    width: int, height: int, pyramid_factor: int, min_level_px: int
) -> list[tuple[int, int, float]]:
    """(width, height, downsample) per level, halving (or quartering) down to ``min_level_px``."""
    levels = [(width, height, 1.0)]
    while max(levels[-1][:2]) > min_level_px:
        d = levels[-1][2] * pyramid_factor
        levels.append((max(1, math.ceil(width / d)), max(1, math.ceil(height / d)), d))
    return levels


def aperio_description(
    width: int, height: int, tile_size: int, quality: int, mpp: float | None, stem: str
) -> str:
    """The ImageDescription OpenSlide's Aperio driver recognises (vendor, mpp, magnification)."""
    scale = f"|AppMag = {round(10.0 / mpp)}|MPP = {mpp:.4f}" if mpp else ""
    return (
        f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] "
        f"({tile_size}x{tile_size}) JPEG/YCC Q={quality}"
        f"{scale}|ScanScope ID = SMARTCCS-SYNTH|Filename = {stem}"
    )


def write_pyramid(
    path: str | Path,
    *,
    width: int,
    height: int,
    mpp: float | None,
    fmt: SlideFormat,
    render: TileRenderer,
    tile_size: int = 256,
    jpeg_quality: int = 85,
    pyramid_factor: int = 2,
    min_level_px: int = 1024,
) -> list[tuple[int, int, float]]:
    """Write a pyramidal slide tile by tile; return its level dimensions and downsamples.

    ``mpp=None`` writes a slide that carries no pixel size at all (no resolution tags, no
    Aperio MPP), as some scanners and converters do: readers must refuse it, not guess.
    """
    if tile_size % 16:
        raise ValueError(f"tile_size {tile_size} must be a multiple of 16 (TIFF tiling)")
    path = Path(path)
    levels = level_dimensions(width, height, pyramid_factor, min_level_px)
    with tifffile.TiffWriter(path, bigtiff=width * height > 2**31) as tw:
        for level, (w, h, d) in enumerate(levels):
            description = None
            if fmt == "svs":
                description = (
                    aperio_description(w, h, tile_size, jpeg_quality, mpp, path.stem)
                    if level == 0
                    else f"Aperio Image Library v12.0.15 \r\n{width}x{height} -> {w}x{h} - "
                )
            resolution = (
                {"resolution": (1e4 / mpp / d, 1e4 / mpp / d), "resolutionunit": "CENTIMETER"}
                if mpp
                else {"resolutionunit": "NONE"}
            )
            tw.write(
                _tiles(render, level, d, w, h, tile_size),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(tile_size, tile_size),
                photometric="rgb",  # stored as subsampled YCbCr JPEG
                subsampling=(2, 2),
                compression="jpeg",
                compressionargs={"level": jpeg_quality},
                **resolution,
                subfiletype=0 if level == 0 else 1,
                description=description,
                software=SOFTWARE,
                metadata=None,
            )
    return levels


def _tiles(
    render: TileRenderer, level: int, d: float, w: int, h: int, ts: int
) -> Iterator[np.ndarray]:
    for y in range(0, h, ts):
        for x in range(0, w, ts):
            tile = render(level, d, x, y, ts, ts)
            if tile.shape != (ts, ts, 3) or tile.dtype != np.uint8:
                raise ValueError(
                    f"renderer returned {tile.shape} {tile.dtype} for a {ts}x{ts} tile"
                )
            yield tile
