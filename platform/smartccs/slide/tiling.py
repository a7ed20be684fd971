"""Tiles at a fixed physical size: the grid is in µm, so the scanner's pixel size cancels out.

The reference pipeline cut 1200 px level-0 tiles whatever the scanner, so a 0.5 µm/px scan
gave tiles covering four times the glass of a 0.25 µm/px one, at half the magnification the
detector was trained on. Here a tile is ``tile_px`` pixels at ``target_mpp`` (default 600 px
at 0.5 µm/px = 300 µm, the reference's field of view), the grid starts at the slide origin
with a stride in µm, and each tile is read from the coarsest pyramid level that still has
the resolution, then resampled to exactly ``tile_px``.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from smartccs.errors import NoForegroundError, TooCoarseError
from smartccs.slide.foreground import DEFAULT_FOREGROUND, ForegroundConfig, foreground_mask
from smartccs.slide.reader import Slide, SlideInfo, on_white, reduce_on_white, rgb_array
from smartccs.slide.specimen import Specimen, assess_specimen

MAX_UPSAMPLE = 0.10
"""A slide may be at most 10% coarser than ``target_mpp``: beyond that, tiles would be
upsampled blur, and the detector would see cells it cannot resolve."""


class TilingConfig(BaseModel):
    """How a slide is cut into model inputs; part of a model's card, so fixed per model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target_mpp: float = Field(
        default=0.5, gt=0.05, lt=20, description="µm per pixel of the tiles the model sees"
    )
    tile_px: int = Field(
        default=600, ge=32, le=8192, description="tile side in pixels at target_mpp"
    )
    overlap_px: int = Field(
        default=0, ge=0, description="pixels shared by neighbouring tiles, at target_mpp"
    )
    min_foreground: float = Field(
        default=0.01,
        ge=0,
        le=1,
        description="a tile is kept when at least this fraction of it is foreground",
    )
    mask_mpp: float = Field(default=8.0, gt=0, description="µm per pixel of the foreground mask")
    foreground: ForegroundConfig = DEFAULT_FOREGROUND

    @model_validator(mode="after")
    def _overlap_below_tile(self) -> TilingConfig:
        if self.overlap_px >= self.tile_px:
            raise ValueError(f"overlap_px {self.overlap_px} must be below tile_px {self.tile_px}")
        return self

    @property
    def tile_um(self) -> float:
        return self.tile_px * self.target_mpp

    @property
    def stride_um(self) -> float:
        return (self.tile_px - self.overlap_px) * self.target_mpp


class TileSpec(BaseModel):
    """One tile: where it is on the glass (level-0 px) and where to read it from."""

    model_config = ConfigDict(frozen=True)

    index: int = Field(description="position in the plan's tile list")
    col: int = Field(description="grid column; the tile starts at col x stride µm")
    row: int = Field(description="grid row")
    x0: int = Field(description="level-0 x of the tile's top-left corner")
    y0: int
    w0: int = Field(description="tile width in level-0 px (may extend past the slide edge)")
    h0: int
    level: int = Field(description="pyramid level the tile is read from")
    fg_fraction: float = Field(description="fraction of the tile that is foreground")


class TilePlan(BaseModel):
    """The tiles of one slide that carry foreground, and what they were planned from."""

    model_config = ConfigDict(frozen=True)

    info: SlideInfo
    config: TilingConfig
    cols: int
    rows: int
    foreground_fraction: float = Field(description="fraction of the slide that is foreground")
    saturation_threshold: float = Field(description="this slide's glass/cell saturation cut")
    od_threshold: float = Field(description="this slide's glass/cell optical-density cut")
    specimen: Specimen | None = Field(
        default=None, description="whether the glass is cytology at all (slide.specimen)"
    )
    tiles: list[TileSpec]


def measure_specimen(slide: Slide, cfg: TilingConfig) -> Specimen:
    """What the specimen guard makes of ``slide``, on the mask :func:`plan_tiles` measures: for
    a caller that wants the verdict without a plan (an upload, blank glass in ``ccs inspect``)."""
    return assess_specimen(foreground_mask(slide, mask_mpp=cfg.mask_mpp, config=cfg.foreground))


def plan_tiles(slide: Slide, cfg: TilingConfig) -> TilePlan:
    """Lay the µm grid over the slide and keep the tiles with enough foreground.

    The plan's ``specimen`` says whether the glass is a cytology preparation at all; planning
    does not act on it (the tile stream and ``ccs inspect`` do). Blank glass raises
    :class:`NoForegroundError`, as there is nothing to tile.
    """
    info = slide.info
    if info.mpp > cfg.target_mpp * (1 + MAX_UPSAMPLE):
        raise TooCoarseError(
            f"{slide.name}: scanned at {info.mpp:g} µm/px, coarser than the "
            f"{cfg.target_mpp:g} µm/px the tiles need; rescan at higher magnification"
        )
    fg = foreground_mask(slide, mask_mpp=cfg.mask_mpp, config=cfg.foreground)
    if not fg.mask.any():
        raise NoForegroundError(
            f"{slide.name}: no cells found (saturation > {fg.saturation_threshold:.3f} or "
            f"optical density > {fg.od_threshold:.3f}): an empty or unstained slide?"
        )
    width_um, height_um = info.width * info.mpp, info.height * info.mpp
    overlap_um = cfg.overlap_px * cfg.target_mpp
    cols = max(1, math.ceil((width_um - overlap_um) / cfg.stride_um))
    rows = max(1, math.ceil((height_um - overlap_um) / cfg.stride_um))
    xs_um = np.arange(cols) * cfg.stride_um
    ys_um = np.arange(rows) * cfg.stride_um
    frac = _tile_fractions(fg.mask, xs_um, ys_um, cfg.tile_um, cfg.mask_mpp)
    keep = frac >= max(cfg.min_foreground, np.finfo(np.float32).tiny)
    level = slide.best_level(cfg.target_mpp / info.mpp)
    size0 = round(cfg.tile_um / info.mpp)
    tiles = [
        TileSpec(
            index=i,
            col=int(c),
            row=int(r),
            x0=round(xs_um[c] / info.mpp),
            y0=round(ys_um[r] / info.mpp),
            w0=size0,
            h0=size0,
            level=level,
            fg_fraction=float(frac[r, c]),
        )
        for i, (r, c) in enumerate(zip(*np.nonzero(keep), strict=True))
    ]
    return TilePlan(
        info=info,
        config=cfg,
        cols=cols,
        rows=rows,
        foreground_fraction=fg.fraction,
        saturation_threshold=fg.saturation_threshold,
        od_threshold=fg.od_threshold,
        specimen=assess_specimen(fg),
        tiles=tiles,
    )


def _tile_fractions(
    mask: np.ndarray, xs_um: np.ndarray, ys_um: np.ndarray, tile_um: float, mask_mpp: float
) -> np.ndarray:
    """Foreground fraction of every grid tile, (rows, cols), from an integral image.

    Tile edges are rounded to whole mask pixels in µm, so two scans of the same glass at
    different pixel sizes see exactly the same mask pixels; the denominator is the whole
    tile, so edge tiles (partly beyond the slide) count the missing part as background.
    """
    h, w = mask.shape
    integral = np.zeros((h + 1, w + 1), np.int64)
    integral[1:, 1:] = mask.cumsum(0).cumsum(1)
    mx0 = np.rint(xs_um / mask_mpp).astype(int)
    mx1 = np.rint((xs_um + tile_um) / mask_mpp).astype(int)
    my0 = np.rint(ys_um / mask_mpp).astype(int)
    my1 = np.rint((ys_um + tile_um) / mask_mpp).astype(int)
    area = np.maximum(1, np.outer(my1 - my0, mx1 - mx0))
    cx0, cx1 = np.clip(mx0, 0, w), np.clip(mx1, 0, w)
    cy0, cy1 = np.clip(my0, 0, h), np.clip(my1, 0, h)
    sums = (
        integral[np.ix_(cy1, cx1)]
        - integral[np.ix_(cy0, cx1)]
        - integral[np.ix_(cy1, cx0)]
        + integral[np.ix_(cy0, cx0)]
    )
    return sums / area


def read_tile(slide: Slide, spec: TileSpec, cfg: TilingConfig) -> np.ndarray:
    """The tile's pixels at ``cfg.target_mpp``: read-only uint8 ``(tile_px, tile_px, 3)``.

    Reads ``spec.level`` (chosen by :func:`plan_tiles` as the coarsest level fine enough) and
    resamples only when that level is not already at the target: an integer factor uses
    PIL's ``reduce`` (a box average, the fastest exact downsample), anything else Lanczos.
    Beyond the slide's edge the tile is white.
    """
    d = slide.info.level_downsamples[spec.level]
    w, h = max(1, round(spec.w0 / d)), max(1, round(spec.h0 / d))
    region = slide.read_rgba(spec.level, spec.x0, spec.y0, w, h)
    n = cfg.tile_px
    if (w, h) == (n, n):
        return rgb_array(region)
    factor = w // n
    if w == h == factor * n:
        return rgb_array(reduce_on_white(region, factor))
    return rgb_array(on_white(region).resize((n, n), Image.Resampling.LANCZOS))
