"""Scoring a detector: AP at IoU 0.5 per class on annotated tiles, and its summaries.

``evaluate_detector`` scores a stream of held-out tiles (optionally each center seen through
its stain calibration); ``score_detector`` scores a saved detector on whole annotated batches,
for arms trained before a center's annotations existed.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
from tqdm.auto import tqdm

from smartccs.adaptation.stain import center_calibration, measure_stain
from smartccs.batches import BatchRef, resolve_batches
from smartccs.data.tiles import StreamConfig, slide_rows
from smartccs.errors import CCSError
from smartccs.ids import SlideKey
from smartccs.labels import SlideBoxes, load_cell_labels
from smartccs.metrics.detection import Boxes, DetectionReport, detection_report
from smartccs.models.artifacts import ModelCard, load_model
from smartccs.models.detector import DETECTION_CLASSES, CellDetector, build_detector, preprocess
from smartccs.stain import StainCalibration, calibrate
from smartccs.store import Store
from smartccs.taxonomy import ABNORMAL_CLASSES
from smartccs.train.detector_data import batch_targets, tiles_dataset

log = logging.getLogger(__name__)


def abnormal_map(report: DetectionReport) -> float:
    """mAP over the six Bethesda classes that have ground truth (normal squamous left out)."""
    aps = [report.ap[c] for c in ABNORMAL_CLASSES if not np.isnan(report.ap.get(c, np.nan))]
    return float(np.mean(aps)) if aps else float("nan")


def abnormal_ap_by_cells(ap: dict[str, float], n_gt: dict[str, int]) -> float:
    """Per-class AP over the abnormal classes, weighted by their held-out cells.

    Beside :func:`abnormal_map`, where each class counts once: on a handful of slides a class
    with 3 held-out cells weighs as much as one with 118 there, and one cell ranked differently
    moves the mean by a tenth.
    """
    pairs = [(ap[c], n_gt.get(c, 0)) for c in ABNORMAL_CLASSES if n_gt.get(c, 0) > 0]
    pairs = [(a, n) for a, n in pairs if not np.isnan(a)]
    total = sum(n for _, n in pairs)
    return float(sum(a * n for a, n in pairs) / total) if total else float("nan")


def evaluate_detector(
    model: CellDetector,
    card: ModelCard,
    ds,
    labels: dict[SlideKey, SlideBoxes],
    batch_size: int,
    n_tiles: int | None = None,
    stain: dict[str, StainCalibration] | None = None,
) -> DetectionReport:
    """AP at IoU 0.5 per class over held-out tiles (each tile an image); ``stain``: per
    center, the calibration its tiles are seen through (what adaptation would apply)."""
    input_px = int(card.head["input_px"])
    model.eval()
    pred: dict[str, list] = defaultdict(list)
    gt: dict[str, list] = defaultdict(list)
    image = 0
    with tqdm(desc="scoring held-out tiles", unit="tile", total=n_tiles, disable=None) as bar:
        for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
            images = batch["image"]
            for center, cal in (stain or {}).items():
                here = batch["center"] == center
                if here.any():
                    images = images.copy() if images is batch["image"] else images
                    images[here] = calibrate(images[here], cal)
            x = preprocess(images, input_px, card.normalization)
            for i, det in enumerate(model.detect(x)):
                boxes, classes = batch_targets(labels, batch, i, input_px)
                pred["image_ids"].append(np.full(len(det.scores), image))
                pred["boxes"].append(det.boxes.numpy())
                pred["scores"].append(det.scores.numpy())
                pred["labels"].append(det.labels.numpy())
                gt["image_ids"].append(np.full(len(classes), image))
                gt["boxes"].append(boxes)
                gt["labels"].append(classes)
                image += 1
            bar.update(len(batch["image"]))
    if image == 0:
        raise CCSError("no held-out tiles to evaluate the detector on")
    return detection_report(
        Boxes(**{k: np.concatenate(v) for k, v in pred.items()}),
        Boxes(**{k: np.concatenate(v) for k, v in gt.items()}),
        DETECTION_CLASSES,
        iou_threshold=0.5,
    )


def report_metrics(report: DetectionReport | None) -> dict[str, float]:
    """A report as card metrics: per-class AP, mAP, the abnormal summaries; finite values only
    (a class without ground truth has none)."""
    if report is None:
        return {}
    summaries = {
        "map50_abnormal": abnormal_map(report),
        "ap50_abnormal_by_cells": abnormal_ap_by_cells(report.ap, report.n_gt),
    }
    return report.to_metrics() | {k: v for k, v in summaries.items() if not np.isnan(v)}


def score_batches(
    model: CellDetector,
    card: ModelCard,
    store: Store,
    refs: list[BatchRef],
    labels: dict[SlideKey, SlideBoxes],
    stream: StreamConfig,
    batch_size: int,
    stain: dict[str, StainCalibration] | None = None,
) -> DetectionReport:
    """Every tile of every slide of these batches, scored against their annotations."""
    ds = tiles_dataset(slide_rows(refs), store, stream)
    return evaluate_detector(model, card, ds, labels, batch_size, stain=stain)


def held_out_calibrations(
    card: ModelCard, store: Store, refs: list[BatchRef], stream: StreamConfig
) -> dict[str, StainCalibration]:
    """Per center of these batches, the stain calibration adaptation would give it (measured
    on all of the center's batches at once); centers inside the training range are absent."""
    by_center: dict[str, list[BatchRef]] = {}
    for ref in refs:
        by_center.setdefault(ref.center, []).append(ref)
    out = {}
    for center, center_refs in by_center.items():
        stats = measure_stain(store.config, slide_rows(center_refs), stream, 64)
        cal = center_calibration(card, stats)
        if cal is not None:
            out[center] = cal
    return out


def score_detector(
    store: Store,
    name: str,
    version: str,
    batches: list[str],
    stream: StreamConfig,
    batch_size: int = 32,
    calibrate_stain: bool = False,
) -> DetectionReport:
    """AP at IoU 0.5 of a saved detector on annotated batches, every tile of every slide
    (with ``calibrate_stain``, each center seen through its stain calibration).

    For detectors trained before a center's annotations existed, or to compare saved arms on
    one more center without retraining them.
    """
    card, state = load_model(store, name, version)
    model = build_detector(card, state)
    refs = resolve_batches(store, batches)
    labels = load_cell_labels(store, refs)
    stain = held_out_calibrations(card, store, refs, stream) if calibrate_stain else None
    return score_batches(model, card, store, refs, labels, stream, batch_size, stain)
