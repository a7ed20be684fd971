"""Input normalization estimated from the tiles a model trains on.

Cytology tiles are mostly bright glass: with ImageNet's mean and std they come out so alike
that an untrained ViT gives every tile nearly the same feature (mean pairwise cosine 0.993
measured on the demo cohort) and DINO's teacher collapsed to a uniform output. The statistics
of the training tiles themselves keep tiles apart; they are fixed once per run (so a resumed
run normalizes as the first attempt did) and travel with the model in its card.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable

import numpy as np

from smartccs import layout
from smartccs.models.artifacts import Normalization
from smartccs.store import Store

log = logging.getLogger(__name__)

PIXEL_STRIDE = 4
"""Every 4th pixel of every 4th row: 1/16 of a tile is plenty for six numbers."""

NORMALIZATION_FILE = "normalization.json"


def tile_statistics(batches: Iterable[np.ndarray], max_tiles: int) -> Normalization:
    """Per-channel mean and std, in [0, 1] units, of up to ``max_tiles`` uint8 RGB tiles."""
    total = np.zeros(3)
    squares = np.zeros(3)
    pixels = 0
    tiles = 0
    for images in batches:
        images = images[: max_tiles - tiles]
        x = images[:, ::PIXEL_STRIDE, ::PIXEL_STRIDE].reshape(-1, 3).astype(np.float64) / 255.0
        total += x.sum(0)
        squares += (x * x).sum(0)
        pixels += len(x)
        tiles += len(images)
        if tiles >= max_tiles:
            break
    if not pixels:
        raise ValueError("no tiles to estimate the input normalization from")
    mean = total / pixels
    std = np.sqrt(np.maximum(squares / pixels - mean * mean, 1e-8))
    return Normalization(mean=tuple(mean.round(4)), std=tuple(std.round(4)))


def resolve_normalization(store: Store, run_name: str, ds, max_tiles: int) -> Normalization:
    """The run's normalization: read back if this run already fixed one, else estimated from
    the first ``max_tiles`` tiles of ``ds`` (a tile dataset) and written next to the run."""
    key = f"{layout.run(run_name)}/{NORMALIZATION_FILE}"
    if store.exists(key):
        return Normalization.model_validate_json(store.read_bytes(key))
    batches = (b["image"] for b in ds.limit(max_tiles).iter_batches(batch_format="numpy"))
    norm = tile_statistics(batches, max_tiles)
    store.write_bytes(key, json.dumps(norm.model_dump(mode="json")).encode())
    log.info("input normalization from %d tiles: mean %s std %s", max_tiles, norm.mean, norm.std)
    return norm
