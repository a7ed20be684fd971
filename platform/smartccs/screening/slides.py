"""From a slide's bag to its row: the MIL head's grades, the adequacy call, the table rows.

The classifier artifact names everything the engine needs (its detector, the frozen encoder,
how cells were cut, top-K, the operating point chosen on held-out slides), so a screening run is
fully pinned by one classifier version. Each batch is called at the threshold
``screening.threshold`` gives its center; the row says which and where it came from.

Adequacy follows the Bethesda System: a liquid-based preparation needs at least 5,000
well-preserved squamous cells (conventional smears 8,000-12,000), pro-rated to the scanned part
of the preparation spot (``screening.adequacy``). The cell scorer counts squamous nuclei on
every tile it reads; when some tiles failed, the count is scaled up by the share that was read.
Below the minimum a slide is still scored but marked ``inadequate``, so its score is never
mistaken for a negative result.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import torch

from smartccs.errors import CCSError
from smartccs.metrics.operating_point import OperatingPoint
from smartccs.models.artifacts import ModelCard, load_card, load_model
from smartccs.models.bag_heads import BagHead, build_bag_head
from smartccs.models.refs import ModelRef
from smartccs.results.schema import (
    CELLS,
    PROB_COLUMNS,
    SLIDES,
    STATUS_FAILED,
    STATUS_INADEQUATE,
    STATUS_REJECTED,
    STATUS_SCREENED,
    THRESHOLD_VALIDATION,
)
from smartccs.screening.adequacy import AdequacyConfig, required_squamous
from smartccs.screening.bags import SlideBag
from smartccs.screening.cells import CellConfig
from smartccs.screening.threshold import AppliedThreshold
from smartccs.store import Store
from smartccs.taxonomy import ABNORMAL_CLASSES, GRADES


def bag_tensors(
    bags: Sequence[SlideBag], augmented: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The MIL head's inputs for ``bags``: embeddings (or their augmented view), scores, mask."""
    if augmented and any(b.aug_embeddings is None for b in bags):
        raise CCSError("smartccs adaptation needs augmented cell views: screen with views=2")
    emb = np.stack([b.aug_embeddings if augmented else b.embeddings for b in bags])
    return (
        torch.from_numpy(emb),
        torch.from_numpy(np.stack([b.scores for b in bags])),
        torch.from_numpy(np.stack([b.mask for b in bags])),
    )


@torch.no_grad()
def predict(head: BagHead, bags: Sequence[SlideBag], batch: int = 64) -> np.ndarray:
    """(N, 7) grade probabilities."""
    head.eval()
    out = []
    for i in range(0, len(bags), batch):
        logits = head(*bag_tensors(bags[i : i + batch]))
        out.append(torch.softmax(logits.float(), -1).numpy())
    return np.concatenate(out) if out else np.zeros((0, len(GRADES)), np.float32)


class SlideClassifier:
    """A classifier version with the pieces of the pipeline it was trained on."""

    def __init__(self, store: Store, ref: ModelRef):
        card, state = load_model(store, ref.name, ref.version)
        head = {"meanmil", "top_k"} if card.head.get("kind") == "meanmil" else {"mil"}
        if card.task != "classifier" or not {*head, "dim", "detector", "encoder"} <= set(card.head):
            raise CCSError(f"model {ref.name}/{card.version} is not a slide classifier")
        self.card: ModelCard = card
        self.ref = ModelRef(name=card.name, version=str(card.version))
        self.dim = int(card.head["dim"])
        self.head = build_bag_head(card, state)
        self._top_k = int(card.head["top_k"] if "top_k" in card.head else card.head["mil"]["top_k"])
        self.detector = ModelRef.model_validate(card.head["detector"])
        self.encoder = ModelRef.model_validate(card.head["encoder"])
        self.cells = CellConfig.model_validate(card.head["cells"])
        self.threshold = float(card.head["threshold"])
        op = card.head.get("operating_point")
        self.operating_point = OperatingPoint.model_validate(op) if op else None

    @property
    def label(self) -> str:
        """The ``classifier`` column: name/version."""
        return self.ref.label

    @property
    def top_k(self) -> int:
        """Cells kept per abnormal class per slide."""
        return self._top_k

    def predict(self, bags: list[SlideBag]) -> np.ndarray:
        return predict(self.head, bags)


def check_adaptation(store: Store, classifier: ModelCard, method: str) -> None:
    """Refuse a method the classifier's detector cannot take, naming both: tent adapts the
    normalisation layers of the platform's own detectors, not an imported Deformable DETR
    (smartccs adaptation works on the slide head and takes any detector)."""
    det = ModelRef.model_validate(classifier.head["detector"])
    if method == "tent" and load_card(store, det.name, det.version).task == "cell_detector":
        raise CCSError(
            f"{classifier.name}/{classifier.version}'s detector {det.label} is an imported "
            "Deformable DETR, which tent does not adapt: use --adapt smartccs or none"
        )


def estimated_squamous(bag: SlideBag) -> int:
    """Squamous cells on the slide, scaled up for tiles that could not be read (a failed
    tile is assumed to hold as many as the slide's read tiles do on average)."""
    if not bag.tiles_read:
        return 0
    return round(bag.n_squamous * max(bag.n_tiles, bag.tiles_read) / bag.tiles_read)


def _prorated(adequacy: AdequacyConfig, bag: SlideBag) -> str:
    """How the minimum was pro-rated, for the note of an inadequate slide."""
    if not np.isfinite(bag.slide_area_mm2):
        return ""
    spot = f"{adequacy.preparation_diameter_mm:g} mm preparation"
    if required_squamous(adequacy, bag.slide_area_mm2) >= adequacy.min_squamous:
        return f" (the minimum for a whole {spot})"
    scanned = f"{bag.slide_area_mm2:.3g} mm² scanned"
    return f" ({adequacy.min_squamous} per {spot}, pro-rated to the {scanned})"


def slides_table(
    bags: list[SlideBag],
    probs: np.ndarray,
    *,
    run_id: str,
    classifier: SlideClassifier,
    adequacy: AdequacyConfig,
    adaptation: str | None = None,
    screened_at: datetime | None = None,
    threshold: AppliedThreshold | None = None,
) -> pa.Table:
    """The ``slides`` rows of one batch: scored slides, and failed or rejected ones with their
    reason.

    ``probs`` holds one row per bag (ignored for slides that read no tile: failed, and rejected
    ones, which the planner found not to be cytology and so have no tile, probability, score
    or ``positive``). ``threshold`` is the one the batch is called at (``screening.threshold``);
    None: the classifier's stored one.
    """
    when = screened_at or datetime.now(UTC)
    applied = threshold or AppliedThreshold(value=classifier.threshold, source=THRESHOLD_VALIDATION)
    cols: dict[str, list] = {f.name: [] for f in SLIDES}
    for bag, p in zip(bags, probs, strict=True):
        read = bag.ok
        squamous = estimated_squamous(bag)
        minimum = required_squamous(adequacy, bag.slide_area_mm2)
        adequate = bool(read and squamous >= minimum)
        status = STATUS_FAILED if not read else STATUS_SCREENED if adequate else STATUS_INADEQUATE
        if bag.rejected:  # not cytology: no tile was read, so no score, never a negative
            status = STATUS_REJECTED
        error = bag.error
        if read and bag.tiles_failed:
            error = f"{bag.tiles_failed} of {bag.n_tiles} tiles failed: {bag.error}"
        if status == STATUS_INADEQUATE:
            note = f"about {squamous} squamous cells, fewer than {minimum}"
            note += _prorated(adequacy, bag)
            error = f"{note}; {error}" if error else note
        score = float(1 - p[0]) if read else None
        values = {
            "slide_id": bag.slide_id,
            "run_id": run_id,
            "status": status,
            "error": error or None,
            **{c: (float(p[i]) if read else None) for i, c in enumerate(PROB_COLUMNS)},
            "score": score,
            "predicted_grade": GRADES[int(np.argmax(p))] if read else None,
            "threshold": applied.value,
            "positive": (score >= applied.value) if score is not None else None,
            "threshold_source": applied.source,
            "threshold_slides": applied.slides,
            "n_tiles": bag.n_tiles,
            "tiles_read": bag.tiles_read,
            "tiles_failed": bag.tiles_failed,
            "n_cells": int(bag.mask.sum()),
            "n_squamous": squamous,
            "adequate": adequate if read else None,
            "slide_mpp": _finite(bag.slide_mpp),
            "background_fraction": _finite(bag.background_fraction),
            "blur": _finite(bag.blur),
            "detector": classifier.detector.label,
            "classifier": classifier.label,
            "encoder": classifier.encoder.label,
            "adaptation": adaptation,
            "screen_seconds": _finite(bag.seconds),
            "screened_at": when,
        }
        for k, v in values.items():
            cols[k].append(v)
    return pa.table(cols, schema=SLIDES)


def cells_table(bags: list[SlideBag], *, run_id: str) -> pa.Table:
    """The ``cells`` rows of one batch: every cell a slide's bag kept, best first per class."""
    cols: dict[str, list] = {f.name: [] for f in CELLS}
    for bag in bags:
        mpp = bag.slide_mpp if np.isfinite(bag.slide_mpp) else None
        for c, name in enumerate(ABNORMAL_CLASSES):
            for rank in np.flatnonzero(bag.mask[c]):
                x0, y0, x1, y1 = (float(v) for v in bag.boxes[c, rank])
                values = {
                    "slide_id": bag.slide_id,
                    "run_id": run_id,
                    "cell_class": name,
                    "rank": int(rank),
                    "score": float(bag.scores[c, rank]),
                    "x0": x0,
                    "y0": y0,
                    "x1": x1,
                    "y1": y1,
                    "width_um": (x1 - x0) * mpp if mpp else None,
                    "height_um": (y1 - y0) * mpp if mpp else None,
                }
                for k, v in values.items():
                    cols[k].append(v)
    return pa.table(cols, schema=CELLS)


def _finite(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None
