"""Which planned tiles a detector run reads: every tile holding an annotated abnormal cell and a
seeded share of the others, decided on coordinates before any pixel is read.

Apart from the detector's training code on purpose: the sampler is unpickled in every planning
task of the tile stream, and this module imports numpy and the label types only (the training
module would bring torch into each of those worker processes, seconds apiece on 2 cores).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from smartccs.data.tiles import tile_draw
from smartccs.ids import SlideKey
from smartccs.labels import SlideBoxes
from smartccs.taxonomy import ABNORMAL_CLASSES


def box_centres(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) xyxy -> (N, 2) centres."""
    return np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)


def centred_on(centres: np.ndarray, x0: int, y0: int, w0: int, h0: int) -> np.ndarray:
    """Which cells belong to a tile: those whose centre lies in its region (each cell to one)."""
    x, y = centres[:, 0], centres[:, 1]
    return (x >= x0) & (x < x0 + w0) & (y >= y0) & (y < y0 + h0)


class TileSampler:
    """Keeps every tile holding an annotated abnormal cell and a fixed share of the others.

    The share is drawn from a hash of the tile's identity, so resumed runs and every epoch
    see the same tiles, and the choice is made on planned coordinates, before pixels are read.
    """

    def __init__(self, labels: dict[SlideKey, SlideBoxes], other_share: float, seed: int):
        self.other_share, self.seed = other_share, seed
        self.centers: dict[SlideKey, np.ndarray] = {}
        for key, cells in labels.items():
            self.centers[key] = box_centres(cells.boxes[np.isin(cells.classes, ABNORMAL_CLASSES)])

    def __call__(self, row: dict[str, Any]) -> bool:
        key = (str(row["center"]), str(row["batch"]), str(row["slide_id"]))
        c = self.centers.get(key)
        x0, y0, w0, h0 = (int(row[k]) for k in ("x0", "y0", "w0", "h0"))
        if c is not None and centred_on(c, x0, y0, w0, h0).any():
            return True
        return tile_draw(row, self.seed) < self.other_share
