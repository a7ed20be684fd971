"""A spatial index of cell centres, so a region query reads only nearby cells.

Rendering a tile asks for the cells that may touch it; a large slide holds ~10^5 cells, so the
specimen buckets them once on a square grid and each query reads a few buckets.
"""

from __future__ import annotations

import math

import numpy as np


class GridIndex:
    """Cells bucketed by centre on a square grid, so a region query reads a few buckets."""

    def __init__(self, x: np.ndarray, y: np.ndarray, reach: np.ndarray, bucket_um: float):
        self.bucket_um = bucket_um
        self.nx = max(1, math.ceil((float(x.max()) if len(x) else 0.0) / bucket_um) + 1)
        self.ny = max(1, math.ceil((float(y.max()) if len(y) else 0.0) / bucket_um) + 1)
        self.max_reach = float(reach.max()) if len(reach) else 0.0
        bucket = self._bucket(x, self.nx) + self._bucket(y, self.ny) * self.nx
        self.order = np.argsort(bucket, kind="stable").astype(np.int32)
        self.starts = np.concatenate(
            [[0], np.cumsum(np.bincount(bucket, minlength=self.nx * self.ny))]
        )

    def _bucket(self, v: np.ndarray | float, n: int) -> np.ndarray:
        return np.clip(np.floor(np.asarray(v) / self.bucket_um), 0, n - 1).astype(np.int64)

    def candidates(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """Indices of cells whose centre lies within ``max_reach`` of the rectangle."""
        r = self.max_reach
        bx0, bx1 = (int(b) for b in self._bucket(np.array([x0 - r, x1 + r]), self.nx))
        by0, by1 = (int(b) for b in self._bucket(np.array([y0 - r, y1 + r]), self.ny))
        parts = [
            self.order[self.starts[row * self.nx + bx0] : self.starts[row * self.nx + bx1 + 1]]
            for row in range(by0, by1 + 1)
        ]
        return np.concatenate(parts) if parts else np.empty(0, np.int32)
