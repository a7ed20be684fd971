"""What the detector learns from: tile targets, augmentation, the sampled tile stream.

Annotated cells become per-tile targets (boxes in the tile's input pixels, with classes); tile
and boxes are augmented together (the 8 square symmetries, stain and exposure jitter, focus
blur); the training tiles are every tile holding an annotated abnormal cell and a seeded share
of the others, chosen on planned coordinates before any pixel is read; ``label_budget`` keeps
the first ``n`` training slides for the label-budget ablation. ``smartccs.train.detector``
trains on them.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from smartccs.batches import BatchRef
from smartccs.data.tile_sampler import TileSampler, box_centres, centred_on
from smartccs.data.tiles import StreamConfig, tile_stream
from smartccs.errors import CCSError
from smartccs.ids import SlideKey
from smartccs.labels import SlideBoxes
from smartccs.models.detector import detection_class
from smartccs.store import Store
from smartccs.train.multicrop import brightness_contrast, gaussian_blur, stain_jitter

TARGET_COLUMNS = ("image", "center", "batch", "slide_id", "x0", "y0", "w0", "h0")
"""What a detector training or evaluation tile carries: its pixels and where it lies."""


class AugmentConfig(BaseModel):
    """Tile and box augmentation: orientation, and the stain/exposure shifts between centers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    color_p: float = Field(default=0.8, ge=0, le=1)
    stain_sigma: float = Field(default=0.1, ge=0)
    stain_bias: float = Field(default=0.05, ge=0)
    brightness: float = Field(default=0.15, ge=0, lt=1)
    contrast: float = Field(default=0.15, ge=0, lt=1)
    hue_deg: float = Field(
        default=0.0, ge=0, le=180, description="stain hue rotation in OD, up to ± this angle"
    )
    blur_p: float = Field(default=0.0, ge=0, le=1, description="chance of a focus blur")
    blur_sigma_px: tuple[float, float] = Field(
        default=(0.5, 2.0), description="blur sigma range, pixels of the input tile"
    )

    @field_validator("blur_sigma_px")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"blur_sigma_px must be 0 < low <= high, got {list(v)}")
        return v


# -- targets ------------------------------------------------------------------------------


def tile_targets(
    cells: SlideBoxes, x0: int, y0: int, w0: int, h0: int, input_px: int
) -> tuple[np.ndarray, np.ndarray]:
    """Annotated cells whose centre lies on the tile, in the tile's input pixels, and classes.

    Cells cut by the tile's edge are clipped to it: their centre is on the tile, so the
    detector sees most of them, and the neighbouring tile does not count them again.
    """
    if not len(cells):
        return np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    on = centred_on(box_centres(cells.boxes), x0, y0, w0, h0)
    labels = np.array([detection_class(c) for c in cells.classes[on]], dtype=object)
    known = np.array([lab is not None for lab in labels], dtype=bool)
    boxes = cells.boxes[on][known] - np.array([x0, y0, x0, y0], np.float64)
    scale = np.array([input_px / w0, input_px / h0] * 2)
    boxes = np.clip(boxes * scale, 0, input_px).astype(np.float32)
    return boxes, labels[known].astype(np.int64)


def batch_targets(
    labels: dict[SlideKey, SlideBoxes], batch: dict[str, np.ndarray], i: int, input_px: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`tile_targets` of row ``i`` of a batch of tile rows."""
    key = (str(batch["center"][i]), str(batch["batch"][i]), str(batch["slide_id"][i]))
    cells = labels.get(key)
    if cells is None:
        raise CCSError(f"no annotations for {'/'.join(key)}")
    x0, y0, w0, h0 = (int(batch[c][i]) for c in ("x0", "y0", "w0", "h0"))
    return tile_targets(cells, x0, y0, w0, h0, input_px)


def assign(
    centers: torch.Tensor, boxes: torch.Tensor, stride: float, radius: float
) -> torch.Tensor:
    """Index of the box each location learns (-1: background), FCOS with centre sampling.

    A location is a positive of a box when it lies inside the box and within ``radius``
    strides of its centre; of several such boxes it takes the smallest.
    """
    if len(boxes) == 0:
        return torch.full((len(centers),), -1, dtype=torch.long)
    x, y = centers[:, None, 0], centers[:, None, 1]
    inside = (x > boxes[:, 0]) & (x < boxes[:, 2]) & (y > boxes[:, 1]) & (y < boxes[:, 3])
    bcx, bcy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    near = ((x - bcx).abs() <= radius * stride) & ((y - bcy).abs() <= radius * stride)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    cost = torch.where(inside & near, area.expand_as(inside), torch.inf)
    best, idx = cost.min(dim=1)
    return torch.where(torch.isfinite(best), idx, -1)


# -- augmentation -------------------------------------------------------------------------


def flip_rotate_boxes(
    img: torch.Tensor, boxes: torch.Tensor, k: int, flip: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror (left-right) then rotate by k x 90 degrees counter-clockwise, image and boxes."""
    size = img.shape[-1]
    if flip:
        img = img.flip(-1)
        boxes = torch.stack([size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]], 1)
    for _ in range(k % 4):
        img = torch.rot90(img, 1, dims=(-2, -1))  # (x, y) -> (y, size - x)
        boxes = torch.stack([boxes[:, 1], size - boxes[:, 2], boxes[:, 3], size - boxes[:, 0]], 1)
    return img, boxes


def augment(
    img: torch.Tensor, boxes: torch.Tensor, cfg: AugmentConfig, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random view of a [0, 1] tile (3, S, S) and its boxes."""
    k = int(torch.randint(0, 4, (1,), generator=g))
    flip = bool(torch.rand(1, generator=g) < 0.5)
    img, boxes = flip_rotate_boxes(img, boxes, k, flip)
    if bool(torch.rand(1, generator=g) < cfg.color_p):
        img = stain_jitter(img, g, cfg.stain_sigma, cfg.stain_bias, cfg.hue_deg)
        img = brightness_contrast(img, g, cfg.brightness, cfg.contrast)
    if cfg.blur_p > 0 and bool(torch.rand(1, generator=g) < cfg.blur_p):
        lo, hi = cfg.blur_sigma_px
        img = gaussian_blur(img, lo + (hi - lo) * float(torch.rand(1, generator=g)))
    return img, boxes


# -- data ---------------------------------------------------------------------------------


def tiles_dataset(
    rows: list[dict[str, Any]],
    store: Store,
    stream: StreamConfig,
    select: TileSampler | None = None,
):
    """Readable tiles of these slides with their coordinates (what the targets need)."""
    return tile_stream(
        rows, store.config, stream, select=select, readable_only=True, columns=TARGET_COLUMNS
    )


def _budget_rank(row: dict[str, Any], seed: int) -> bytes:
    key = f"budget:{seed}:{row['center']}:{row['batch']}:{row['slide_id']}"
    return hashlib.sha256(key.encode()).digest()


def label_budget(
    rows: list[dict[str, Any]], refs: list[BatchRef], n: int, seed: int
) -> list[dict[str, Any]]:
    """The first ``n`` of these training slides, for a label-budget ablation.

    Slides are ordered within each stratum (center x normal/abnormal) by a hash of their
    identity and the split seed, and the strata are taken in turn, abnormal ones first (they
    hold the cells the detector is for), so a budget of one slide per center gives each
    center an abnormal slide; a larger budget always contains a smaller one.
    """
    grades = {(r.center, r.batch, s.slide_id): s.grade for r in refs for s in r.manifest.slides}
    strata: dict[tuple[str, bool], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        key = (row["center"], row["batch"], row["slide_id"])
        strata[(row["center"], (grades.get(key) or "NILM") != "NILM")].append(row)
    queues = []
    for stratum in sorted(strata, key=lambda k: (not k[1], k[0])):  # abnormal first, by center
        members = strata[stratum]
        members.sort(key=lambda r: _budget_rank(r, seed))
        queues.append(members)
    out: list[dict[str, Any]] = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out
