"""Squamous nuclei counted from a tile's pixels: the count that specimen adequacy needs.

**The count** is classical image analysis, not the detector: the detector's scores are not
calibrated (a demo detector trained for 150 CPU steps scores no normal cell above 0.57, so a
0.5 cut counted 2% of them), and a count that moves with training length cannot decide
adequacy. Every squamous cell has one nucleus, and in a Pap stain the nucleus is the one small,
dense, smooth, hematoxylin-dark body inside a large, thin, translucent cytoplasm. So per tile:

1. optical density, and its excess over the local background: a grey opening over a square
   wider than any normal squamous nucleus and narrower than a squamous cell, so each nucleus
   is measured against its own cytoplasm and overlapping cytoplasm (broad) cancels;
2. smoothed at chromatin-granule scale, so one nucleus is one blob;
3. blobs above a floor, each split into cores at half its peak (full width at half maximum: a
   size that does not depend on how dark the stain is, and two touching nuclei are two cores);
4. a core is a normal squamous nucleus (superficial, intermediate or parabasal cell) when it
   is dense enough, of normal squamous nuclear size, a smooth oval (not the lobed nucleus of a
   neutrophil) and not a thin sliver.

Tiles do not overlap (by default), so a nucleus on a tile border appears on two tiles: the
tile that sees it touch its right or bottom edge counts it, the one that sees it touch its left
or top edge does not. The count needs no model and runs where the tiles are already read (the
cell scorer).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from smartccs.slide.foreground import optical_density


class SquamousCount(BaseModel):
    """The rules of the nucleus count. Each holds for Pap-stained preparations in general, not
    for one center: sizes are in µm and µm², densities in optical density above the cell's own
    cytoplasm, and no rule depends on the stain's hue."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    background_um: float = Field(
        default=10.0,
        gt=0,
        description="side of the square the local background is opened over: wider than a "
        "normal squamous nucleus (at most 8-9 µm across), narrower than a squamous cell "
        "(35-60 µm; parabasal 15-25), so a nucleus is measured against its own cytoplasm",
    )
    smooth_um: float = Field(
        default=1.0,
        ge=0,
        description="Gaussian sigma: chromatin granules are under 1 µm, nuclei 3 µm and more, "
        "so one nucleus becomes one blob and keeps its size at half maximum",
    )
    floor_od: float = Field(
        default=0.08,
        gt=0,
        description="excess density that delimits a blob: about one layer of cytoplasm, which "
        "is translucent (that is why overlapping Pap cells can be read)",
    )
    nucleus_od: float = Field(
        default=0.15,
        gt=0,
        description="peak excess density of a nucleus: hematoxylin makes a nucleus absorb "
        "several times what its cytoplasm does; cytoplasm overlaps and folds stay below",
    )
    min_area_um2: float = Field(
        default=8.0,
        gt=0,
        description="smallest nucleus (3.2 µm across): a superficial cell's pyknotic nucleus "
        "is about 4-5 µm; smaller specks are debris, bacteria or noise",
    )
    max_area_um2: float = Field(
        default=70.0,
        gt=0,
        description="largest normal squamous nucleus: twice the intermediate cell's (~35 µm², "
        "Bethesda's yardstick; ASC-US starts at 2.5-3 times, LSIL and HSIL are larger)",
    )
    min_fill: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="area over that of the ellipse with the same second moments: about 1 for "
        "the smooth oval nucleus of a squamous cell, less for a neutrophil's 2-5 lobes",
    )
    max_elongation: float = Field(
        default=2.0,
        ge=1,
        description="longest over shortest axis: squamous nuclei are round to oval (about 1.5 "
        "at most); longer shapes are slivers where two cells' edges overlap",
    )


DEFAULT_COUNT = SquamousCount()


def count_squamous(
    images: np.ndarray,
    mpp: float,
    cfg: SquamousCount = DEFAULT_COUNT,
    overlap_px: int = 0,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Normal squamous nuclei per tile of uint8 RGB tiles (N, H, W, 3) at ``mpp`` µm/px.

    With ``overlap_px`` (neighbouring tiles sharing pixels), a nucleus is counted by the tile
    whose central ``tile - overlap`` square holds its centre, instead of the edge rule.
    """
    n = len(images)
    if n == 0:
        return np.zeros(0, np.int64)
    b = nucleus_cores(images, mpp, cfg, device)
    h, w = images.shape[1:3]
    cut = b["right"] | b["bottom"]
    if overlap_px > 0:
        m = overlap_px / 2
        own = (b["x"] >= m) & (b["x"] < w - m) & (b["y"] >= m) & (b["y"] < h - m)
        cut = cut | b["left"] | b["top"]
    else:
        own = ~(b["left"] | b["top"])
    dense = b["peak"] >= cfg.nucleus_od
    shape = (b["fill"] >= cfg.min_fill) & (b["elongation"] <= cfg.max_elongation)
    whole = (b["area_um2"] >= cfg.min_area_um2) & shape
    keep = own & dense & (b["area_um2"] <= cfg.max_area_um2) & (whole | cut)  # cut: a part
    return np.bincount(b["tile"][keep], minlength=n)


def nucleus_cores(
    images: np.ndarray,
    mpp: float,
    cfg: SquamousCount = DEFAULT_COUNT,
    device: torch.device | str | None = None,
) -> dict[str, np.ndarray]:
    """Every candidate nucleus of the tiles, with what the rules test: ``tile``, ``peak`` (its
    own highest excess density), ``area_um2``, ``fill``, ``elongation``, centroid ``x``, ``y``
    (px), and ``left``, ``top``, ``right``, ``bottom``: its blob touches that tile edge."""
    excess = _excess_density(images, mpp, cfg, device)
    h, w = excess.shape[1:]
    blob, flat = label(excess >= cfg.floor_od)
    value = excess.reshape(-1)[flat]
    n_blobs = int(blob.max()) + 1 if len(blob) else 0
    blob_peak = _group_max(blob, value, n_blobs)
    ys, xs = np.divmod(flat % (h * w), w)
    edges = {
        side: _group_max(blob, on.astype(np.float64), n_blobs) > 0
        for side, on in (("left", xs == 0), ("top", ys == 0), ("right", xs == w - 1),
                         ("bottom", ys == h - 1))
    }  # fmt: skip
    # each blob's cores: its pixels above half its peak, split where they do not touch
    core_px = flat[value >= 0.5 * blob_peak[blob]]
    blob_of = np.full(excess.size, -1, np.int32)
    blob_of[flat] = blob
    core_mask = np.zeros(excess.shape, bool)
    core_mask.reshape(-1)[core_px] = True
    core, cflat = label(core_mask)
    k = int(core.max()) + 1 if len(core) else 0
    parent = np.zeros(k, np.int64)
    parent[core] = blob_of[cflat]
    tile, rest = np.divmod(cflat, h * w)
    y, x = (a.astype(np.float64) for a in np.divmod(rest, w))

    def mean(a: np.ndarray) -> np.ndarray:
        return np.bincount(core, weights=a, minlength=k) / area

    area = np.bincount(core, minlength=k).astype(np.float64)
    mx, my = mean(x), mean(y)
    sxx = mean(x * x) - mx * mx + 1 / 12  # + a pixel's own spread
    syy = mean(y * y) - my * my + 1 / 12
    sxy = mean(x * y) - mx * my
    det = np.maximum(sxx * syy - sxy * sxy, 1e-12)
    half_diff = np.sqrt(((sxx - syy) / 2) ** 2 + sxy * sxy)
    major, minor = (sxx + syy) / 2 + half_diff, np.maximum((sxx + syy) / 2 - half_diff, 1e-12)
    return {
        "tile": _group_max(core, tile.astype(np.float64), k).astype(np.int64),
        "peak": _group_max(core, excess.reshape(-1)[cflat].astype(np.float64), k),
        "area_um2": area * mpp * mpp,
        "fill": area / (4 * math.pi * np.sqrt(det)),  # 1 for a uniformly filled ellipse
        "elongation": np.sqrt(major / minor),
        "x": mx,
        "y": my,
    } | {side: on[parent] for side, on in edges.items()}


def label(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected components of a bool mask: each foreground pixel's component (0..K-1, in
    ``np.flatnonzero`` order) and the pixels' flat positions.

    Union-find over the mask's pixels only (hook to the smaller root, then pointer jumping), so
    the cost follows the few nuclear pixels of a tile, not its area. Components never cross
    from one image of a stack to the next (no neighbour offset leaves an image).
    """
    flat = np.flatnonzero(mask)
    pos = np.full(mask.shape, -1, np.int32 if mask.size < 2**31 else np.int64)
    pos.reshape(-1)[flat] = np.arange(len(flat))
    us, vs = [], []
    for a, b in (
        (np.s_[..., :, :-1], np.s_[..., :, 1:]),
        (np.s_[..., :-1, :], np.s_[..., 1:, :]),
        (np.s_[..., :-1, :-1], np.s_[..., 1:, 1:]),
        (np.s_[..., :-1, 1:], np.s_[..., 1:, :-1]),
    ):
        both = mask[a] & mask[b]
        us.append(pos[a][both])
        vs.append(pos[b][both])
    u, v = np.concatenate(us), np.concatenate(vs)
    parent = np.arange(len(flat))
    while True:
        before = parent
        low = np.minimum(parent[u], parent[v])
        parent = parent.copy()
        np.minimum.at(parent, before[u], low)
        np.minimum.at(parent, before[v], low)
        while True:  # pointer jumping: every pixel points at its tree's root
            up = parent[parent]
            if np.array_equal(up, parent):
                break
            parent = up
        if np.array_equal(parent, before):
            break
    return np.unique(parent, return_inverse=True)[1], flat


def _excess_density(
    images: np.ndarray, mpp: float, cfg: SquamousCount, device: torch.device | str | None
) -> np.ndarray:
    """(N, H, W) optical density above its local background (a grey opening), smoothed."""
    od = torch.from_numpy(optical_density(images))[:, None].to(device or "cpu")
    excess = _gaussian(od - _opening(od, cfg.background_um / mpp), cfg.smooth_um / mpp)
    return excess[:, 0].cpu().numpy()


def _opening(od: torch.Tensor, side_px: float) -> torch.Tensor:
    """Grey opening of (N, 1, H, W) over a square of ``side_px``: the largest value under which
    a square that size fits, i.e. the background a smaller, darker body sits on.

    Computed on blocks of a quarter of the side (block minima first, which a body smaller than
    the square cannot raise), then brought back to full size: 16x fewer pixels to open, and the
    background is smooth at that scale anyway.
    """
    block = max(1, int(side_px // 8))
    h, w = od.shape[-2:]
    x = -F.max_pool2d(-od, block, block, ceil_mode=True) if block > 1 else od
    k = max(1, round(side_px / block)) | 1  # odd
    x = _max_square(-_max_square(-x, k), k)
    if block > 1:
        x = x.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :h, :w]
    return x


def _max_square(x: torch.Tensor, k: int) -> torch.Tensor:
    """Maximum over a k x k square (k odd), as two 1-D passes: O(k) per pixel, not O(k^2)."""
    x = F.max_pool2d(x, (k, 1), 1, (k // 2, 0))
    return F.max_pool2d(x, (1, k), 1, (0, k // 2))


def _gaussian(x: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """(N, 1, H, W) smoothed separably by a Gaussian of ``sigma_px``, edges replicated."""
    if sigma_px < 0.3:
        return x
    r = max(1, math.ceil(3 * sigma_px))
    g = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) / sigma_px) ** 2)
    g = g / g.sum()
    y = F.conv2d(F.pad(x, (r, r, r, r), mode="replicate"), g.view(1, 1, 1, -1))
    return F.conv2d(y, g.view(1, 1, -1, 1))


def _group_max(group: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    out = np.full(n, -np.inf)
    np.maximum.at(out, group, values)
    return out
