"""Cell-detection metrics: box IoU, per-class average precision and a mAP report.

AP is VOC-style all-point interpolated: the area under the monotone (right-to-left running
maximum) envelope of the precision/recall curve. Matching is greedy by descending score; a
detection matches the unmatched ground-truth box of the *same image* with the highest IoU,
provided that IoU is ``>= iou_threshold``; every ground-truth box is matched at most once, so a
second detection on an already-found cell is a false positive. Detections with equal scores are
processed in input order (stable sort), which makes the result deterministic.

Numpy only, so training workers and the evaluation job import it without extra dependencies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "Boxes",
    "DetectionReport",
    "average_precision",
    "box_iou",
    "detection_report",
]


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class Boxes:
    """Boxes over a set of images: one row per box, arrays of equal length N.

    ``image_ids`` (N,) any hashable scalar dtype (ints or strings; detections and ground truth
    must use the same kind), ``boxes`` (N, 4) float xyxy in pixels with ``x2 >= x1`` and
    ``y2 >= y1``, ``labels`` (N,) int class indices (optional: :func:`average_precision` works
    on one class and ignores them), ``scores`` (N,) float confidences (required for
    predictions). Arrays are copied and made read-only so a report cannot be changed under it.
    """

    image_ids: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray | None = None
    scores: np.ndarray | None = None

    def __init__(
        self,
        image_ids: ArrayLike,
        boxes: ArrayLike,
        labels: ArrayLike | None = None,
        scores: ArrayLike | None = None,
    ) -> None:
        ids = np.asarray(image_ids)
        if ids.ndim != 1:
            raise ValueError(f"image_ids must be 1-D (N,), got shape {ids.shape}")
        if ids.size == 0:
            ids = ids.astype(np.int64)
        elif ids.dtype.kind == "S" or (
            ids.dtype.kind == "O" and all(isinstance(x, str) for x in ids)
        ):
            ids = ids.astype(np.str_)
        if ids.dtype.kind not in "iuU":
            raise ValueError(f"image_ids must be integers or strings, got dtype {ids.dtype}")
        n = len(ids)

        b = np.asarray(boxes, dtype=np.float64)
        if n == 0 and b.size == 0:
            b = b.reshape(0, 4)
        if b.shape != (n, 4):
            raise ValueError(f"boxes must have shape (N, 4) = ({n}, 4), got {b.shape}")
        if not np.isfinite(b).all():
            raise ValueError("boxes must be finite (no NaN or inf)")
        if (b[:, 2] < b[:, 0]).any() or (b[:, 3] < b[:, 1]).any():
            raise ValueError("boxes must be xyxy with x2 >= x1 and y2 >= y1")

        lab = None
        if labels is not None:
            lab = np.asarray(labels)
            if lab.shape != (n,):
                raise ValueError(f"labels must have shape (N,) = ({n},), got {lab.shape}")
            if n and lab.dtype.kind not in "iu":
                if (
                    lab.dtype.kind == "f"
                    and np.isfinite(lab).all()
                    and (lab == np.round(lab)).all()
                ):
                    lab = lab.astype(np.int64)
                else:
                    raise ValueError(f"labels must be integer class indices, got dtype {lab.dtype}")
            lab = lab.astype(np.int64)
            if (lab < 0).any():
                raise ValueError("labels must be non-negative class indices")

        sc = None
        if scores is not None:
            sc = np.asarray(scores, dtype=np.float64)
            if sc.shape != (n,):
                raise ValueError(f"scores must have shape (N,) = ({n},), got {sc.shape}")
            if not np.isfinite(sc).all():
                raise ValueError("scores must be finite (no NaN or inf)")

        object.__setattr__(self, "image_ids", _frozen(ids))
        object.__setattr__(self, "boxes", _frozen(b))
        object.__setattr__(self, "labels", None if lab is None else _frozen(lab))
        object.__setattr__(self, "scores", None if sc is None else _frozen(sc))

    def __len__(self) -> int:
        return len(self.image_ids)

    def select(self, mask: np.ndarray) -> Boxes:
        """The rows where ``mask`` is true (e.g. one class), keeping every field."""
        return Boxes(
            self.image_ids[mask],
            self.boxes[mask],
            None if self.labels is None else self.labels[mask],
            None if self.scores is None else self.scores[mask],
        )


def box_iou(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """IoU matrix (N, M) between xyxy boxes ``a`` (N, 4) and ``b`` (M, 4), pixel-continuous.

    Pairs whose union has zero area (two degenerate boxes) get IoU 0 rather than NaN.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0.0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    return iou


def _as_boxes(x: Boxes | Sequence[Any], name: str, *, need_scores: bool) -> Boxes:
    if not isinstance(x, Boxes):
        x = tuple(x)
        if need_scores:
            if len(x) != 3:
                raise ValueError(f"{name} must be Boxes or (image_ids, boxes, scores)")
            x = Boxes(x[0], x[1], scores=x[2])
        else:
            if len(x) != 2:
                raise ValueError(f"{name} must be Boxes or (image_ids, boxes)")
            x = Boxes(x[0], x[1])
    if need_scores and x.scores is None:
        raise ValueError(f"{name} must have scores")
    return x


def _check_iou_threshold(t: float) -> float:
    t = float(t)
    if not 0.0 < t <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {t}")
    return t


def _image_codes(det_ids: np.ndarray, gt_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes shared by detections and ground truth; refuse mixing ints with strings."""
    if (det_ids.dtype.kind in "iu") != (gt_ids.dtype.kind in "iu"):
        raise ValueError(
            "image_ids of detections and ground_truth must be the same kind (both integers or "
            f"both strings), got {det_ids.dtype} and {gt_ids.dtype}"
        )
    kind = np.int64 if det_ids.dtype.kind in "iu" else np.str_
    both = np.concatenate([det_ids.astype(kind), gt_ids.astype(kind)])
    _, codes = np.unique(both, return_inverse=True)
    codes = codes.reshape(-1)
    return codes[: len(det_ids)], codes[len(det_ids) :]


def _match(det: Boxes, gt: Boxes, iou_threshold: float) -> np.ndarray:
    """True-positive flags of detections in descending-score order (stable for ties)."""
    assert det.scores is not None
    order = np.argsort(-det.scores, kind="stable")
    tp = np.zeros(len(order), dtype=bool)
    if len(gt) == 0 or len(order) == 0:
        return tp
    det_codes, gt_codes = _image_codes(det.image_ids, gt.image_ids)
    ranked_codes = det_codes[order]
    # Images are independent: a detection only competes for ground truth of its own image, so
    # greedy matching can run image by image, in rank order within each image.
    by_image = np.argsort(ranked_codes, kind="stable")
    uniq, starts = np.unique(ranked_codes[by_image], return_index=True)
    gt_by_image = np.argsort(gt_codes, kind="stable")
    gt_sorted = gt_codes[gt_by_image]
    for code, ranks in zip(uniq, np.split(by_image, starts[1:]), strict=True):
        lo, hi = np.searchsorted(gt_sorted, [code, code + 1])
        if lo == hi:
            continue
        g = gt_by_image[lo:hi]
        iou = box_iou(det.boxes[order[ranks]], gt.boxes[g])
        taken = np.zeros(len(g), dtype=bool)
        for r, row in zip(ranks, iou, strict=True):
            cand = np.where(taken, -1.0, row)
            j = int(np.argmax(cand))
            if cand[j] >= iou_threshold:
                taken[j] = True
                tp[r] = True
    return tp


def _interpolated_ap(tp: np.ndarray, n_gt: int) -> float:
    """Area under the monotone precision envelope (all-point interpolation)."""
    if len(tp) == 0:
        return 0.0
    tp_cum = np.cumsum(tp)
    recall = tp_cum / n_gt
    precision = tp_cum / np.arange(1, len(tp) + 1)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    step = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))


def average_precision(
    detections: Boxes | Sequence[Any],
    ground_truth: Boxes | Sequence[Any],
    iou_threshold: float = 0.5,
) -> float:
    """AP of one class: ``detections`` (image_ids, boxes, scores), ``ground_truth`` (image_ids,
    boxes), each a :class:`Boxes` or a plain tuple of arrays; labels, if any, are ignored.

    Returns NaN when the class has no ground truth: AP is undefined there (any detection is a
    false positive, but there is no recall axis), and a 0 would wrongly drag a mean down.
    Returns 0.0 when there is ground truth but no detection.
    """
    det = _as_boxes(detections, "detections", need_scores=True)
    gt = _as_boxes(ground_truth, "ground_truth", need_scores=False)
    iou_threshold = _check_iou_threshold(iou_threshold)
    if len(gt) == 0:
        return math.nan
    return _interpolated_ap(_match(det, gt, iou_threshold), len(gt))


def _nan_from_none(v: Any) -> Any:
    if v is None:
        return math.nan
    if isinstance(v, dict):
        return {k: math.nan if x is None else x for k, x in v.items()}
    return v


class DetectionReport(BaseModel):
    """Per-class AP and mAP at one IoU threshold.

    ``ap`` is NaN for a class without ground truth; such classes are left out of ``map`` (NaN
    only when no class has ground truth). JSON dumps write NaN as ``null`` and reading it back
    restores NaN; :meth:`to_metrics` gives the flat, finite-only dict that trackers and model
    cards take.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="null")

    iou_threshold: float = Field(gt=0.0, le=1.0)
    ap: dict[str, float]
    map: float
    n_gt: dict[str, int]
    n_pred: dict[str, int]

    @field_validator("ap", "map", mode="before")
    @classmethod
    def _none_is_nan(cls, v: Any) -> Any:
        return _nan_from_none(v)

    def to_metrics(self) -> dict[str, float]:
        """Flat ``{"map50": .., "ap50/ASC-US": ..}``, skipping classes without ground truth."""
        t = round(self.iou_threshold * 100)
        out: dict[str, float] = {}
        if not math.isnan(self.map):
            out[f"map{t}"] = self.map
        for name, v in self.ap.items():
            if not math.isnan(v):
                out[f"ap{t}/{name}"] = v
        return out


def detection_report(
    pred: Boxes,
    gt: Boxes,
    classes: Sequence[str],
    iou_threshold: float = 0.5,
) -> DetectionReport:
    """Per-class AP and mAP; ``pred`` needs labels and scores, ``gt`` needs labels.

    Labels are indices into ``classes``. A prediction only ever matches ground truth of its own
    class and image.
    """
    classes = list(classes)
    if not classes:
        raise ValueError("classes must not be empty")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes must be unique, got {classes}")
    iou_threshold = _check_iou_threshold(iou_threshold)
    if not isinstance(pred, Boxes) or pred.labels is None or pred.scores is None:
        raise ValueError("pred must be Boxes with labels and scores")
    if not isinstance(gt, Boxes) or gt.labels is None:
        raise ValueError("gt must be Boxes with labels")
    for name, b in (("pred", pred), ("gt", gt)):
        assert b.labels is not None
        if len(b) and b.labels.max() >= len(classes):
            raise ValueError(
                f"{name}.labels has class index {int(b.labels.max())} but only "
                f"{len(classes)} classes are given"
            )
    ap: dict[str, float] = {}
    n_gt: dict[str, int] = {}
    n_pred: dict[str, int] = {}
    for k, name in enumerate(classes):
        p = pred.select(pred.labels == k)
        g = gt.select(gt.labels == k)
        ap[name] = average_precision(p, g, iou_threshold)
        n_gt[name] = len(g)
        n_pred[name] = len(p)
    defined = [v for v in ap.values() if not math.isnan(v)]
    mean = float(np.mean(defined)) if defined else math.nan
    return DetectionReport(iou_threshold=iou_threshold, ap=ap, map=mean, n_gt=n_gt, n_pred=n_pred)
