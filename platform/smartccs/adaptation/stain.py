"""Stain calibration: a center's tiles shown to the models in the stain they were trained on.

The detector finds abnormal cells by how dark and how large their nuclei are, so a center
whose stain is 30% stronger makes every nucleus look hyperchromatic and one whose stain is
faded hides the abnormal ones; augmentation cannot teach a model which of the two it is
looking at, but the center's own population of cells can. Each adapted batch measures its
center's stain on a sample of its tiles (``smartccs.stain.stain_stats``), the measurement is
carried across the center's batches in its adapted state, and every tile is mapped, in
optical density, to the nearest stain inside the range of the detector's training centers
(recorded in its card as a ``stain_reference``). A center already inside that range is left
exactly as it is.
"""

from __future__ import annotations

import logging
from typing import Any

from smartccs.batches import BatchRef
from smartccs.data.tiles import StreamConfig, sample_tiles, slide_rows
from smartccs.models.artifacts import ModelCard
from smartccs.stain import StainCalibration, StainReference, StainStats, calibration, stain_stats
from smartccs.store import StoreConfig

log = logging.getLogger(__name__)

REFERENCE_KEY = "stain_reference"
"""Where a detector card's head keeps the stain of its training centers."""


def measure_stain(
    store_config: StoreConfig, rows: list[dict[str, Any]], stream: StreamConfig, tiles: int
) -> StainStats | None:
    """The stain of these slides, from ``tiles`` tiles spread over them; None without stain
    (a batch of blank or unreadable slides): such a batch leaves the center's measure as it is.
    Runs anywhere (a Ray task in the engine)."""
    sample = sample_tiles(store_config, rows, stream, tiles)
    try:
        return stain_stats(sample)
    except ValueError as e:
        log.warning("stain of %d slides not measured: %s", len(rows), e)
        return None


def stain_reference(
    store_config: StoreConfig, refs: list[BatchRef], stream: StreamConfig, tiles: int = 64
) -> StainReference | None:
    """One measurement per center of these batches: what a model trained on them has seen
    (None when no center has stain to measure)."""
    by_center: dict[str, list[BatchRef]] = {}
    for ref in refs:
        by_center.setdefault(ref.center, []).append(ref)
    centers = {}
    for center, center_refs in sorted(by_center.items()):
        stats = measure_stain(store_config, slide_rows(center_refs), stream, tiles)
        if stats is not None:
            centers[center] = stats
    return StainReference(centers=centers) if centers else None


def detector_reference(card: ModelCard) -> StainReference | None:
    raw = card.head.get(REFERENCE_KEY)
    return StainReference.model_validate(raw) if raw else None


def center_calibration(card: ModelCard, stats: StainStats | None) -> StainCalibration | None:
    """The map for a center measured as ``stats`` into the detector's training range; None when
    there is nothing to do (not measured, no reference, or already inside the range)."""
    reference = detector_reference(card)
    if stats is None or reference is None:
        return None
    cal = calibration(reference, stats)
    return None if cal.identity else cal
