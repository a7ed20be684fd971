"""Where the cells are: a foreground mask for cytology at a fixed physical resolution.

Cytology is sparse cells on bright glass, not a tissue section: most of a slide is
background, cells are pale (cytoplasm) or dark (nuclei), and the background's own tint
varies by center (stain carry-over, mounting medium, scanner white balance). So a pixel is
foreground when it is more saturated (HSV S) or darker (optical density) than this slide's
own background, estimated robustly from the image (median + k·MAD, which the background
dominates), never below fixed floors so that clean glass with no cells stays empty.

The mask is computed on a low-resolution pyramid level resampled (area average) to a fixed
µm/px, so the same glass scanned at 0.25 or 0.5 µm/px gives the same mask and the same
tiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter
from pydantic import BaseModel, ConfigDict, Field

from smartccs.slide.reader import Slide, rgb_array

_CHUNK_LEVEL_PX = 4096  # level pixels a side per read: 64 MiB RGBA, even without a pyramid

# optical density of each 8-bit intensity, from a lookup table rather than a log per pixel
_OD_LUT = (-np.log10(np.maximum(np.arange(256), 1) / 255.0)).astype(np.float32)


class ForegroundConfig(BaseModel):
    """Thresholds of the foreground test; the defaults suit Pap-stained cytology."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mad_k: float = Field(
        default=4.0, gt=0, description="threshold = background median + mad_k x 1.4826 MAD"
    )
    margin: float = Field(
        default=0.02,
        ge=0,
        description="minimum distance of a threshold above the background median, for "
        "flat backgrounds whose MAD is near zero",
    )
    saturation_floor: float = Field(
        default=0.06, ge=0, le=1, description="minimum HSV saturation threshold (clean glass)"
    )
    saturation_ceiling: float = Field(
        default=0.25,
        ge=0,
        le=1,
        description="maximum saturation threshold, for dense slides where cells are the median",
    )
    od_floor: float = Field(
        default=0.07, ge=0, description="minimum optical-density threshold (mean over RGB)"
    )
    od_ceiling: float = Field(default=0.3, ge=0, description="maximum optical-density threshold")
    dilate_um: float = Field(
        default=8.0, ge=0, description="grow the mask by this much, to keep cell borders"
    )


DEFAULT_FOREGROUND = ForegroundConfig()


@dataclass(frozen=True)
class ForegroundMask:
    """A boolean mask whose pixel (i, j) covers µm [j·mpp, (j+1)·mpp) x [i·mpp, (i+1)·mpp)."""

    mask: np.ndarray
    mpp: float
    saturation_threshold: float
    od_threshold: float
    stained: np.ndarray | None = None
    """The pixels that passed the test themselves, before ``dilate_um``: what the specimen
    guard measures (the dilation merges neighbouring cells into one object)."""

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def pixel_features(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV saturation in [0, 1] and optical density (mean over R, G, B) per pixel.

    Channel by channel rather than reducing over the last axis: on strided tile views
    (the read path hands those out) this is several times faster.
    """
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx = np.maximum(np.maximum(r, g), b)
    mn = np.minimum(np.minimum(r, g), b)
    sat = (mx - mn) / np.maximum(mx, 1).astype(np.float32)
    return sat, optical_density(rgb)


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Optical density per pixel, the mean over R, G and B of uint8 ``rgb`` (..., 3): the unit
    of the foreground test and of the adequacy count's nucleus density."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return (np.take(_OD_LUT, r) + np.take(_OD_LUT, g) + np.take(_OD_LUT, b)) * np.float32(1 / 3)


def foreground_from_rgb(
    rgb: np.ndarray, mpp: float, config: ForegroundConfig = DEFAULT_FOREGROUND
) -> ForegroundMask:
    """The mask of an image already at the mask resolution ``mpp``."""
    sat, od = pixel_features(rgb)
    s_thr = _threshold(sat, config, config.saturation_floor, config.saturation_ceiling)
    od_thr = _threshold(od, config, config.od_floor, config.od_ceiling)
    stained = (sat > s_thr) | (od > od_thr)
    mask = stained
    radius = round(config.dilate_um / mpp)
    if radius > 0 and mask.any():
        grown = Image.fromarray(mask.astype(np.uint8) * 255).filter(
            ImageFilter.MaxFilter(2 * radius + 1)
        )
        mask = np.asarray(grown) > 0
    return ForegroundMask(mask, mpp, s_thr, od_thr, stained)


def _threshold(values: np.ndarray, config: ForegroundConfig, floor: float, ceiling: float) -> float:
    med = float(np.median(values))
    mad = float(np.median(np.abs(values - med)))
    spread = max(config.mad_k * 1.4826 * mad, config.margin)
    return min(max(med + spread, floor), max(ceiling, floor))


def foreground_mask(
    slide: Slide, *, mask_mpp: float = 8.0, config: ForegroundConfig = DEFAULT_FOREGROUND
) -> ForegroundMask:
    """The slide's foreground at ``mask_mpp`` µm/px, from its coarsest adequate level."""
    return foreground_from_rgb(slide_at_mpp(slide, mask_mpp), mask_mpp, config)


def slide_at_mpp(slide: Slide, mpp: float) -> np.ndarray:
    """The whole slide resampled (area average) to ``mpp`` µm/px, origin at the slide's.

    Reads the coarsest level that is at least as fine as ``mpp``, in chunks so that a slide
    without a pyramid does not need its whole level 0 in memory.
    """
    info = slide.info
    level = slide.best_level(mpp / info.mpp)
    d = info.level_downsamples[level]
    scale = mpp / info.level_mpp(level)  # level px per output px, >= 1 but for tolerance
    out_w = max(1, math.ceil(info.width * info.mpp / mpp))
    out_h = max(1, math.ceil(info.height * info.mpp / mpp))
    out = np.empty((out_h, out_w, 3), np.uint8)
    chunk = max(1, int(_CHUNK_LEVEL_PX / scale))  # output px per read
    for oy in range(0, out_h, chunk):
        for ox in range(0, out_w, chunk):
            ow, oh = min(chunk, out_w - ox), min(chunk, out_h - oy)
            # the chunk's extent in (fractional) level px, read whole pixels around it; what
            # lies beyond the slide comes back transparent and averages in as white glass
            fx0, fy0, fx1, fy1 = ox * scale, oy * scale, (ox + ow) * scale, (oy + oh) * scale
            lx0, ly0 = int(fx0), int(fy0)
            lw, lh = math.ceil(fx1) - lx0, math.ceil(fy1) - ly0
            region = slide.read_rgba(level, round(lx0 * d), round(ly0 * d), lw, lh)
            box = (fx0 - lx0, fy0 - ly0, fx1 - lx0, fy1 - ly0)
            small = region.resize((ow, oh), Image.Resampling.BOX, box=box)
            out[oy : oy + oh, ox : ox + ow] = rgb_array(small)
    return out
