"""The one definition of a cell's outline: Fourier harmonics around a stretched, rotated disc.

The renderer looks the outline up per pixel and the ground-truth boxes and areas sample it, so
boxes fit what is drawn; both read the contour from here.
"""

from __future__ import annotations

import functools

import numpy as np

from smartccs.synth.cell_table import HARMONICS


def contour_table(
    shape: np.ndarray,
    tail: np.ndarray | None = None,
    tail_dir: np.ndarray | None = None,
    samples: int = 96,
) -> np.ndarray:
    """Contour radius relative to the mean radius at ``samples`` angles over [0, 2 pi), (n, S).

    The one definition of a cell's outline: the renderer looks it up per pixel and the
    ground-truth boxes sample it, so boxes fit what is drawn. ``tail`` is relative to radius.
    """
    phi, cos_k, sin_k = _harmonic_basis(samples)
    table = np.maximum(1.0 + shape[:, :, 0] @ cos_k + shape[:, :, 1] @ sin_k, 0.2)
    if tail is not None and tail_dir is not None:
        table += tail[:, None] * np.maximum(np.cos(phi[None, :] - tail_dir[:, None]), 0.0) ** 16
    return table.astype(np.float32)


@functools.cache
def _harmonic_basis(samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Angles and cos/sin of each harmonic at them, (S,), (K, S), (K, S)."""
    phi = np.arange(samples, dtype=np.float64) * (2 * np.pi / samples)
    k = np.arange(1, HARMONICS + 1, dtype=np.float64)
    return phi, np.cos(np.outer(k, phi)), np.sin(np.outer(k, phi))


def contour_extent(
    x: np.ndarray,
    y: np.ndarray,
    radius: np.ndarray,
    aspect: np.ndarray,
    theta: np.ndarray,
    shape: np.ndarray,
    tail: np.ndarray | None = None,
    tail_dir: np.ndarray | None = None,
    samples: int = 128,
) -> np.ndarray:
    """Tight (n, 4) x0, y0, x1, y1 of star-shaped contours (``tail`` in um here)."""
    rel_tail = None if tail is None else tail / np.maximum(radius, 1e-6)
    b = radius[:, None] * contour_table(shape, rel_tail, tail_dir, samples)
    phi = np.arange(samples) * (2 * np.pi / samples)
    u = b * np.cos(phi) * aspect[:, None]
    v = b * np.sin(phi) / aspect[:, None]
    ct, st = np.cos(theta)[:, None], np.sin(theta)[:, None]
    dx = u * ct - v * st
    dy = u * st + v * ct
    return np.stack([x + dx.min(1), y + dy.min(1), x + dx.max(1), y + dy.max(1)], axis=1).astype(
        np.float64
    )
