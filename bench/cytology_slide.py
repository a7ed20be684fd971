"""A quick cytology-like pyramidal slide for benchmarks: sparse stained cells, textured glass.

Not the synthetic cohort (``smartccs.synth`` models cell classes and centers); this only has
to cost what a real slide costs to decode: JPEG tiles with noise and cell edges everywhere
cells are, flat glass elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from smartccs.synth.writer import SlideFormat, write_pyramid

_BIN = 1024  # level-0 px per spatial bin used to find the cells a tile overlaps


def _cells(width: int, height: int, mpp: float, coverage: float, seed: int) -> np.ndarray:
    """Cells as rows (cx, cy, r_cyto, r_nuc, R, G, B) in level-0 px, clustered like a smear."""
    rng = np.random.default_rng(seed)
    r_um = rng.uniform(12, 30, size=10**6)  # squamous cells 25-60 µm across
    mean_area = float(np.mean(np.pi * (r_um / mpp) ** 2))
    n = int(coverage * width * height / mean_area)
    centres = rng.uniform(0, 1, size=(max(1, n // 6), 2)) * (width, height)
    pick = rng.integers(0, len(centres), size=n)
    spread = 300 / mpp  # clusters a few hundred µm across
    xy = centres[pick] + rng.normal(0, spread, size=(n, 2))
    r = r_um[:n] / mpp
    nuc = r * rng.uniform(0.12, 0.35, size=n)
    cyan = rng.random(n) < 0.6  # cyanophilic (blue-green) vs eosinophilic (pink) cytoplasm
    rgb = np.where(
        cyan[:, None],
        rng.normal((150, 185, 200), 12, size=(n, 3)),
        rng.normal((225, 150, 180), 12, size=(n, 3)),
    )
    return np.column_stack([xy, r, nuc, rgb])


class CytologyRenderer:
    """``write_pyramid`` callback drawing the same cells at every level."""

    def __init__(self, width: int, height: int, mpp: float, coverage: float = 0.25, seed: int = 0):
        self.cells = _cells(width, height, mpp, coverage, seed)
        self.seed = seed
        bins: dict[tuple[int, int], list[int]] = {}
        for i, (cx, cy, r, *_rest) in enumerate(self.cells):
            for bx in range(int((cx - r) // _BIN), int((cx + r) // _BIN) + 1):
                for by in range(int((cy - r) // _BIN), int((cy + r) // _BIN) + 1):
                    bins.setdefault((bx, by), []).append(i)
        self.bins = {k: np.array(v) for k, v in bins.items()}

    def __call__(self, level: int, d: float, x: int, y: int, w: int, h: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, level, x, y))
        img = np.empty((h, w, 3), np.float32)
        img[:] = (238, 234, 236)
        img += rng.normal(0, 2.5, size=(h, w, 1))
        x0, y0, x1, y1 = x * d, y * d, (x + w) * d, (y + h) * d
        found = [
            self.bins.get((bx, by), ())
            for bx in range(int(x0 // _BIN), int(x1 // _BIN) + 1)
            for by in range(int(y0 // _BIN), int(y1 // _BIN) + 1)
        ]
        idx = np.unique(np.concatenate([np.asarray(f, int) for f in found])) if found else []
        for i in idx:
            cx, cy, r, rn, cr, cg, cb = self.cells[i]
            if cx + r < x0 or cx - r > x1 or cy + r < y0 or cy - r > y1:
                continue
            # the cell's bounding box in this level's tile coordinates
            lx0, lx1 = max(0, int((cx - r - x0) / d)), min(w, int((cx + r - x0) / d) + 1)
            ly0, ly1 = max(0, int((cy - r - y0) / d)), min(h, int((cy + r - y0) / d) + 1)
            if lx0 >= lx1 or ly0 >= ly1:
                continue
            gx = (np.arange(lx0, lx1) + 0.5) * d + x0 - cx
            gy = (np.arange(ly0, ly1) + 0.5) * d + y0 - cy
            dist = np.sqrt(gx[None, :] ** 2 + gy[:, None] ** 2)
            cyto = np.clip((r - dist) / (1.5 * d), 0, 1)[..., None] * 0.55
            nucl = np.clip((rn - dist) / (1.0 * d), 0, 1)[..., None]
            box = img[ly0:ly1, lx0:lx1]
            box[:] = box * (1 - cyto) + cyto * (cr, cg, cb)
            box[:] = box * (1 - nucl) + nucl * (70, 60, 120)
        return np.clip(img, 0, 255).astype(np.uint8)


def write_cytology_slide(
    path: str | Path,
    *,
    width: int,
    height: int,
    mpp: float = 0.25,
    fmt: SlideFormat = "svs",
    pyramid_factor: int = 2,
) -> Path:
    """Write the benchmark slide (20k x 20k px: about 25 s on one core)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    render = CytologyRenderer(width, height, mpp)
    write_pyramid(
        path,
        width=width,
        height=height,
        mpp=mpp,
        fmt=fmt,
        render=render,
        pyramid_factor=pyramid_factor,
    )
    return path
