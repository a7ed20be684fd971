"""A detector card run on tiles: each tile's abnormal cells, in the tile's own pixels.

Two kinds of detector reach the screening engine: the platform's own (task ``detector``,
smartccs.models.detector, on a frozen-encoder backbone) and the Smart-CCS reference's imported
Deformable DETR (task ``cell_detector``, smartccs.models.deformable_detr). Each has its own
input size, normalisation and decoding; ``TileDetector`` hides which, so the cell scorer keeps,
cuts and embeds cells the same way whichever found them.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import NamedTuple

import numpy as np
import torch

from smartccs.errors import CCSError
from smartccs.models.artifacts import load_model
from smartccs.models.detector import build_detector, preprocess
from smartccs.models.loaders import cell_detector
from smartccs.models.norms import apply_norms
from smartccs.models.refs import ModelRef
from smartccs.store import Store
from smartccs.taxonomy import ABNORMAL_CLASSES


class Found(NamedTuple):
    """One tile's abnormal detections, best first."""

    classes: torch.Tensor  # (N,) index into ABNORMAL_CLASSES
    scores: torch.Tensor  # (N,)
    boxes: torch.Tensor  # (N, 4) xyxy, pixels of the tile as read (the card's tiling)


def autocast(device: torch.device) -> AbstractContextManager:
    """bfloat16 on a GPU (as in training); full precision on CPU, where it is not faster."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


class TileDetector:
    """A detector version, loaded once, mapping read tiles to their abnormal cells."""

    def __init__(
        self,
        store: Store,
        ref: ModelRef,
        device: torch.device,
        norms: dict[str, np.ndarray] | None = None,
    ):
        self.device = device
        self.card, state = load_model(store, ref.name, ref.version)
        if self.imported:
            if norms:
                raise CCSError(
                    f"{ref.label} is an imported Deformable DETR: tent adapts only the "
                    "platform's own detectors"
                )
            self.network: torch.nn.Module = cell_detector(self.card, state)
        else:
            self.network = build_detector(self.card, state)
            if norms:  # a center's adapted normalisation layers (tent)
                apply_norms(self.network, {k: torch.tensor(np.array(v)) for k, v in norms.items()})
        self.network.eval().to(device)

    @property
    def imported(self) -> bool:
        return self.card.task == "cell_detector"

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> list[Found]:
        """(B, H, W, 3) uint8 tiles -> each one's abnormal detections."""
        if not len(images):
            return []
        if self.imported:
            return self._imported(images)
        input_px = int(self.card.head["input_px"])
        x = preprocess(images, input_px, self.card.normalization).to(self.device)
        with autocast(self.device):
            detections = self.network.detect(x)
        scale = self.card.tiling.tile_px / input_px
        out = []
        for det in detections:
            labels, scores = det.labels.cpu(), det.scores.float().cpu()
            keep = torch.nonzero(labels < len(ABNORMAL_CLASSES)).squeeze(1)
            keep = keep[scores[keep].argsort(descending=True)]
            out.append(Found(labels[keep], scores[keep], det.boxes.float().cpu()[keep] * scale))
        return out

    def _imported(self, images: np.ndarray) -> list[Found]:
        tiles = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
        h, w = tiles.shape[-2:]
        with autocast(self.device):  # the tile itself as the region: boxes in tile pixels
            found = self.network.detect(tiles.to(self.device), [(0.0, 0.0, w, h)] * len(tiles))
        return [
            Found(
                torch.tensor([ABNORMAL_CLASSES.index(c) for c in det.labels], dtype=torch.long),
                torch.tensor(det.scores, dtype=torch.float32),
                torch.tensor(det.boxes, dtype=torch.float32).reshape(-1, 4),
            )
            for det in found  # best first already (deformable_detr.decode)
        ]
