"""Small real pyramidal slides with known content, for tests.

Dark "cells" (discs) at known positions in µm on bright glass, drawn at every pyramid level
from the same µm geometry, so that two scans of the same glass at different pixel sizes can
be compared exactly; plus hand-made TIFFs for what the writer deliberately never produces.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile

from smartccs.synth.writer import SlideFormat, write_pyramid

GLASS = (240, 238, 241)
CELL = (120, 80, 150)  # a stained cell: saturated and dark

Disc = tuple[float, float, float]  # centre x, centre y, radius, in µm


def disc_renderer(mpp: float, discs: Sequence[Disc], *, glass=GLASS, cell=CELL):
    """``write_pyramid`` callback drawing ``discs`` (µm) on glass, at any level."""
    glass_px = np.array(glass, np.float32)
    cell_px = np.array(cell, np.float32)

    def render(level: int, d: float, x: int, y: int, w: int, h: int) -> np.ndarray:
        px_um = mpp * d
        xs = (x + np.arange(w) + 0.5) * px_um
        ys = (y + np.arange(h) + 0.5) * px_um
        inside = np.zeros((h, w), bool)
        for cx, cy, r in discs:
            inside |= (xs[None, :] - cx) ** 2 + (ys[:, None] - cy) ** 2 <= r * r
        return np.where(inside[..., None], cell_px, glass_px).astype(np.uint8)

    return render


def disc_slide(
    path: Path,
    *,
    mpp: float,
    size_um: tuple[float, float],
    discs: Sequence[Disc],
    fmt: SlideFormat = "svs",
    pyramid_factor: int = 2,
    min_level_px: int = 256,
    declare_mpp: bool = True,
    **render_kw,
) -> Path:
    """Write a slide of ``size_um`` µm at ``mpp`` with ``discs``; returns ``path``.

    ``declare_mpp=False`` draws at ``mpp`` but writes no pixel size into the file.
    """
    write_pyramid(
        path,
        width=round(size_um[0] / mpp),
        height=round(size_um[1] / mpp),
        mpp=mpp if declare_mpp else None,
        fmt=fmt,
        render=disc_renderer(mpp, discs, **render_kw),
        pyramid_factor=pyramid_factor,
        min_level_px=min_level_px,
    )
    return path


def write_disc_slide(
    path: Path, *, fmt: SlideFormat = "svs", mpp: float | None = 0.25, size_px: int = 1024
) -> Path:
    """A small slide with a few cells; ``mpp=None`` writes one that declares no pixel size."""
    scale = mpp or 0.25
    side_um = size_px * scale
    discs = [(side_um * fx, side_um * fy, 12.0) for fx, fy in ((0.2, 0.3), (0.5, 0.5), (0.8, 0.7))]
    return disc_slide(
        path,
        mpp=scale,
        size_um=(side_um, side_um),
        discs=discs,
        fmt=fmt,
        declare_mpp=mpp is not None,
    )


def plain_tiff(path: Path, *, size: int = 512, description: str | None = None, **resolution):
    """A single-level tiled JPEG TIFF with the given resolution tags (tifffile keywords)."""
    data = np.full((size, size, 3), 200, np.uint8)
    tifffile.imwrite(
        path,
        data,
        tile=(256, 256),
        photometric="rgb",
        compression="jpeg",
        metadata=None,
        description=description,
        **resolution,
    )
    return path


def tiff_bomb(path: Path, side: int, tile: int = 4096) -> Path:
    """A valid tiled TIFF declaring ``side`` x ``side`` px in a few hundred KB.

    Every tile offset points at the same deflated blank tile: what a malicious upload would
    do to make a naive reader allocate or decode terapixels.
    """
    n = (-(-side // tile)) ** 2
    blank = zlib.compress(bytes(tile * tile * 3), 9)
    data_off = 8
    bps_off = data_off + len(blank)
    offs_off = bps_off + 6
    counts_off = offs_off + 4 * n
    ifd_off = counts_off + 4 * n
    tags = [  # (tag, type, count, value or offset); type 3 = SHORT, 4 = LONG
        (256, 4, 1, side),
        (257, 4, 1, side),
        (258, 3, 3, bps_off),
        (259, 3, 1, 8),  # deflate
        (262, 3, 1, 2),  # RGB
        (277, 3, 1, 3),
        (284, 3, 1, 1),
        (322, 4, 1, tile),
        (323, 4, 1, tile),
        (324, 4, n, offs_off),
        (325, 4, n, counts_off),
    ]
    out = bytearray(struct.pack("<2sHI", b"II", 42, ifd_off))
    out += blank + struct.pack("<3H", 8, 8, 8)
    out += struct.pack(f"<{n}I", *([data_off] * n))
    out += struct.pack(f"<{n}I", *([len(blank)] * n))
    out += struct.pack("<H", len(tags))
    for code, typ, count, value in tags:
        if typ == 3 and count == 1:  # a SHORT value sits left-aligned in the 4-byte field
            out += struct.pack("<HHIHH", code, typ, count, value, 0)
        else:
            out += struct.pack("<HHII", code, typ, count, value)
    out += struct.pack("<I", 0)
    path.write_bytes(out)
    return path


def corrupt_jpeg_tile(src: Path, dst: Path, page: int, tile: int | None) -> Path:
    """``src`` with the middle of one JPEG tile of one pyramid page zeroed (every tile of the
    page when ``tile`` is None): a valid pyramid whose reads of that tile fail in libjpeg."""
    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tif:
        offsets, counts = tif.pages[page].dataoffsets, tif.pages[page].databytecounts
    tiles = list(zip(offsets, counts, strict=True))
    for off, count in tiles if tile is None else [tiles[tile]]:
        data[off + 200 : off + count - 10] = bytes(count - 210)
    dst.write_bytes(bytes(data))
    return dst
