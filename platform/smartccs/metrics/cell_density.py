"""Where a slide's abnormal cells are: a score-weighted density on a grid over the slide.

The report's heatmaps (smartccs.evaluation.figures) and the review workstation's heatmap layer
(smartccs.review) draw the same density with the same colours, so a cytologist's viewer and an
analyst's report agree. The unit is physical, score-weighted abnormal cells per mm², so slides
drawn on one scale compare at a glance: a NILM slide with a few weak detections looks cold
beside an HSIL one.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

DENSITY_CMAP = "inferno"


def _gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian smoothing with zero padding (numpy only)."""
    if sigma <= 0:
        return a
    radius = max(1, math.ceil(3 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    out = a.astype(np.float64)
    for axis in (0, 1):
        padded = np.pad(out, [(radius, radius) if ax == axis else (0, 0) for ax in (0, 1)])
        acc = np.zeros_like(out)
        n = out.shape[axis]
        for j, w in enumerate(k):
            acc += w * (padded[j : j + n] if axis == 0 else padded[:, j : j + n])
        out = acc
    return out


def cell_density(
    shape: tuple[int, int],
    boxes: np.ndarray,
    scores: np.ndarray,
    px_per_level0: float,
    sigma_px: float,
) -> np.ndarray:
    """Score-weighted 2D histogram of box centres on a ``shape`` (h, w) grid whose pixel is
    ``1 / px_per_level0`` level-0 pixels, Gaussian-smoothed by ``sigma_px`` grid pixels."""
    h, w = shape
    hist = np.zeros((h, w))
    if len(boxes):
        cx = (boxes[:, 0] + boxes[:, 2]) / 2 * px_per_level0
        cy = (boxes[:, 1] + boxes[:, 3]) / 2 * px_per_level0
        ix = np.clip(cx.astype(np.int64), 0, w - 1)
        iy = np.clip(cy.astype(np.int64), 0, h - 1)
        np.add.at(hist, (iy, ix), scores)
    return _gaussian_blur(hist, sigma_px)


def cell_boxes(cells: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(N, 4) level-0 xyxy boxes and (N,) scores of ``cells`` rows (the ``cells`` table's)."""
    if cells.num_rows == 0:
        return np.zeros((0, 4)), np.zeros(0)
    cols = [cells[c].to_numpy(zero_copy_only=False) for c in ("x0", "y0", "x1", "y1")]
    return (
        np.stack(cols, axis=1).astype(np.float64),
        cells["score"].to_numpy(zero_copy_only=False).astype(np.float64),
    )


def density_map(
    width: int,
    height: int,
    mpp: float,
    boxes: np.ndarray,
    scores: np.ndarray,
    grid_mpp: float,
    sigma_um: float = 80.0,
) -> np.ndarray:
    """Score-weighted abnormal cells per mm² on a ``grid_mpp`` µm/px grid over a slide of
    level-0 ``width`` x ``height`` px at ``mpp`` µm/px; ``boxes`` are level-0 xyxy."""
    h = max(1, math.ceil(height * mpp / grid_mpp))
    w = max(1, math.ceil(width * mpp / grid_mpp))
    px_area_mm2 = (grid_mpp / 1000.0) ** 2
    return cell_density((h, w), boxes, scores, mpp / grid_mpp, sigma_um / grid_mpp) / px_area_mm2


def density_rgba(density: np.ndarray, vmax: float) -> np.ndarray:
    """(h, w, 4) colours in [0, 1]: the colormap up to ``vmax``, opacity growing with the
    density, so empty glass stays clear and the slide shows through."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    vmax = vmax if vmax > 0 else 1.0
    overlay = colormaps[DENSITY_CMAP](Normalize(0.0, vmax)(density))
    level = np.clip(density / vmax, 0.0, 1.0)
    overlay[..., 3] = np.where(level < 0.01, 0.0, 0.8 * level**0.75)
    return overlay
