"""Screening results against ground truth: slide-level ROC/AUC, grade confusion, cell AP.

:func:`evaluate` works on in-memory Arrow tables: the ``slides`` and ``cells`` result tables
(``smartccs.results.schema``, with ``center`` and ``batch`` columns as ``read_table`` gives
them), the slide truth (``smartccs.evaluation.truth``) and, optionally, cell annotations
(``smartccs.labels.load_cell_labels``). It reuses ``smartccs.metrics`` for every number.

Rules (also written into every report, see :data:`RULES`):

* A slide is positive (abnormal) when its ground-truth grade is not NILM; it is predicted
  positive when its ``score`` (1 - P(NILM)) is ``>= threshold``, its own row's threshold.
* ``failed`` slides have no score. They are never silently dropped: each group reports how many
  failed, and how many of those were abnormal in truth, but they are not in AUC, sensitivity or
  specificity.
* ``inadequate`` slides are scored: the metrics are computed over screened + inadequate slides,
  and the inadequate ones are counted separately (and how many were abnormal).
* ``rejected`` slides (not a cytology preparation) are like failed ones: no score, counted
  with how many were abnormal, never in the metrics and never a negative.
* The threshold is each slide's ``threshold`` column, the platform's: the one stored with the
  classifier (``threshold_source`` ``validation``, or null in older rows) or that operating
  point carried to the slide's center from its unlabelled scores (``center``). It may differ
  between centers and batches; every scored slide must have one. Results of several
  classifiers (or detectors) are refused, asking to filter by center/batch: a pooled AUC of two
  models describes neither.
* Sensitivity and specificity count each slide at its own threshold (not one global one), with
  Wilson score CIs; the specificity at each of ``sensitivity_targets`` (0.90, 0.95) is read off
  the group's own ROC (the best a threshold tuned on these slides could do, for comparison).
* Slides of the results without ground truth are counted (``n_without_truth``), not evaluated;
  truth slides of the evaluated batches with no row in the results are counted too
  (``n_not_in_results``).
* The 7 x 7 confusion matrix counts scored slides by true grade (rows) and ``predicted_grade``
  (columns).
* Detection: the ``cells`` table holds only the top-K kept abnormal cells per class of each
  slide. They are matched to the annotated abnormal cells of the scored slides that have
  annotations, by level-0 boxes at IoU >= 0.5 (``iou``), giving per-class AP
  (``smartccs.metrics.detection``). This is the AP of the kept cells: recall is capped by K, so
  it is not the detector's AP over all its detections.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from smartccs.evaluation.detection import (
    DETECTION_NOTE,
    CellRows,
    DetectionResult,
    detection_result,
)
from smartccs.evaluation.tables import EvaluationError
from smartccs.evaluation.tables import column as _col
from smartccs.evaluation.tables import key_name as _key_name
from smartccs.evaluation.tables import one_value as _one_value
from smartccs.evaluation.tables import require as _require
from smartccs.evaluation.tables import truth_map as _truth_map
from smartccs.ids import SlideKey
from smartccs.labels import SlideBoxes
from smartccs.metrics.classification import (
    BinaryReport,
    binary_report,
    confusion_matrix,
    roc_curve,
)
from smartccs.metrics.operating_point import OperatingPoint
from smartccs.results.schema import (
    PROB_COLUMNS,
    SLIDE_STATUSES,
    STATUS_FAILED,
    STATUS_INADEQUATE,
    STATUS_REJECTED,
    STATUS_SCREENED,
    THRESHOLD_CENTER,
    THRESHOLD_VALIDATION,
)
from smartccs.taxonomy import GRADES

__all__ = [
    "RULES",
    "ConfusionMatrix",
    "DetectionResult",
    "Evaluation",
    "EvaluationConfig",
    "EvaluationError",
    "GroupResult",
    "ModelInfo",
    "RocCurve",
    "evaluate",
    "slide_outcomes",
    "threshold_text",
]

OVERALL = "overall"
NEGATIVE_GRADE = "NILM"

RULES: tuple[str, ...] = (
    "Positive = ground-truth grade other than NILM; predicted positive = score >= the slide's "
    "own threshold (score = 1 - P(NILM)).",
    "Failed slides have no score: they are counted (and how many were abnormal), not scored.",
    "Inadequate slides are scored: metrics are over screened + inadequate slides, with the "
    "inadequate ones counted separately.",
    "Rejected slides (not a cytology preparation) are counted like failed ones, never scored "
    "and never negative.",
    "Each slide is called at the threshold the platform called it at (the slides table's "
    "threshold): the one stored with the classifier, or that operating point carried to the "
    "slide's center from the center's unlabelled slides, so it can differ between centers and "
    "batches. Several classifiers in one evaluation are refused.",
    "Sensitivity and specificity count each slide at its own threshold, not at one global "
    "threshold, and have Wilson score CIs; 'specificity at "
    "sensitivity s' is read off the group's own ROC: the highest specificity of any point whose "
    "sensitivity is >= s (what a threshold tuned on these slides would give, for comparison).",
    "Slides without ground truth are counted, not evaluated.",
    "Confusion matrix: scored slides, true grade (rows) by predicted grade (columns).",
    "Detection: kept cells (top-K per class) against annotated abnormal cells, level-0 boxes, "
    "IoU >= the configured threshold. " + DETECTION_NOTE,
)

SLIDE_COLUMNS = (
    "center",
    "batch",
    "slide_id",
    "status",
    "score",
    "threshold",
    "predicted_grade",
    "classifier",
)
_SOURCE_WORDS = {
    THRESHOLD_VALIDATION: "stored with the classifier",
    THRESHOLD_CENTER: "carried to the center",
}
_FILTER_HINT = (
    "evaluate one model at a time: --model NAME[/VERSION], or select its results with "
    "--center/--batch (the model, centers, batches arguments)"
)


class EvaluationConfig(BaseModel):
    """How the numbers are computed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_boot: int = Field(default=1000, ge=1, description="bootstrap resamples for the AUC CI")
    seed: int = Field(default=0, description="bootstrap seed: the same seed, the same CI")
    alpha: float = Field(default=0.05, gt=0.0, lt=1.0, description="CI level is 1 - alpha")
    iou: float = Field(default=0.5, gt=0.0, le=1.0, description="box IoU for a detection match")
    sensitivity_targets: tuple[Annotated[float, Field(gt=0.0, le=1.0)], ...] = Field(
        default=(0.90, 0.95), description="report the ROC's specificity at these sensitivities"
    )


class RocCurve(BaseModel):
    """One group's ROC points and its operating point: each slide called at its own threshold
    (so the point need not lie on the curve when the group's slides have several)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fpr: list[float]
    tpr: list[float]
    auc: float
    threshold: float | None = Field(description="the slides' threshold; None when they differ")
    threshold_min: float | None = None
    threshold_max: float | None = None
    operating_fpr: float = Field(description="1 - specificity, each slide at its threshold")
    operating_tpr: float = Field(description="sensitivity, each slide at its threshold")


class ConfusionMatrix(BaseModel):
    """Slide counts: rows are the true grade, columns the predicted grade, in ``labels`` order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    labels: list[str] = Field(default_factory=lambda: list(GRADES))
    counts: list[list[int]]
    n: int = Field(ge=0)


class GroupResult(BaseModel):
    """One group of slides: ``overall`` or one center."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="null")

    name: str
    n_slides: int = Field(ge=0, description="slides in the results with ground truth")
    n_positive: int = Field(ge=0, description="of those, abnormal (not NILM) in truth")
    n_scored: int = Field(ge=0, description="screened + inadequate: what the metrics use")
    n_inadequate: int = Field(ge=0)
    n_inadequate_positive: int = Field(ge=0)
    n_failed: int = Field(ge=0, description="no score; not in the metrics")
    n_failed_positive: int = Field(ge=0)
    n_rejected: int = Field(default=0, ge=0, description="not cytology; not in the metrics")
    n_rejected_positive: int = Field(default=0, ge=0)
    n_without_truth: int = Field(ge=0, description="results slides with no ground truth")
    n_not_in_results: int = Field(ge=0, description="truth slides of these batches not screened")
    binary: BinaryReport | None = None
    binary_reason: str | None = Field(default=None, description="why binary is None")
    roc: RocCurve | None = None
    confusion: ConfusionMatrix
    detection: DetectionResult | None = None
    detection_reason: str | None = Field(default=None, description="why detection is None")


class ModelInfo(BaseModel):
    """The models the evaluated results came from, as the slides table names them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    classifier: str | None = None
    detector: str | None = None
    encoder: str | None = None
    threshold: float | None = Field(default=None, description="None when the slides' differ")
    threshold_min: float | None = None
    threshold_max: float | None = None
    threshold_sources: list[str] = Field(
        default_factory=list, description="the scored slides' threshold_source values"
    )
    operating_point: OperatingPoint | None = Field(
        default=None, description="how the classifier's card says its threshold was chosen"
    )


class Evaluation(BaseModel):
    """Everything ``metrics.json`` holds; ``groups[0]`` is ``overall``, then one per center."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="null")

    config: EvaluationConfig
    model: ModelInfo
    partitions: list[str] = Field(description="'center/batch' of the evaluated results")
    run_ids: list[str]
    groups: list[GroupResult]
    rules: list[str] = Field(default_factory=lambda: list(RULES))
    results_uri: str | None = None
    truth_source: str | None = None
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def group(self, name: str) -> GroupResult:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    @property
    def overall(self) -> GroupResult:
        return self.group(OVERALL)


# --- inputs -------------------------------------------------------------------------------


class _Slides:
    """The slides table as Python columns, validated once."""

    def __init__(self, slides: pa.Table):
        _require(slides, SLIDE_COLUMNS, "slides")
        n = slides.num_rows
        self.keys: list[SlideKey] = [
            (str(c), str(b), str(s))
            for c, b, s in zip(
                _col(slides, "center"), _col(slides, "batch"), _col(slides, "slide_id"), strict=True
            )
        ]
        self.status: list[str] = _col(slides, "status")
        self.score: list[float | None] = _col(slides, "score")
        self.error: list[str | None] = _col(slides, "error")
        seen: set[SlideKey] = set()
        for i, key in enumerate(self.keys):
            if key in seen:
                raise EvaluationError(
                    f"the slides table has {_key_name(key)} twice: one row per slide expected"
                )
            seen.add(key)
            if self.status[i] not in SLIDE_STATUSES:
                raise EvaluationError(
                    f"slide {_key_name(key)}: status {self.status[i]!r} is not one of "
                    f"{', '.join(SLIDE_STATUSES)}"
                )
        self.scored = [s in (STATUS_SCREENED, STATUS_INADEQUATE) for s in self.status]
        self.threshold: list[float | None] = _col(slides, "threshold")
        for i, key in enumerate(self.keys):
            sc, thr = self.score[i], self.threshold[i]
            if self.scored[i] and (sc is None or not math.isfinite(sc)):
                raise EvaluationError(
                    f"slide {_key_name(key)} is {self.status[i]} but has no finite score"
                )
            if self.scored[i] and (thr is None or not math.isfinite(thr)):
                raise EvaluationError(
                    f"slide {_key_name(key)} is {self.status[i]} but has no finite threshold "
                    f"({thr}): the slides table must store the threshold each slide was "
                    "called at"
                )
        self.predicted = self._predicted(slides)
        self.model = ModelInfo(
            classifier=_one_value(_col(slides, "classifier"), "classifiers", _FILTER_HINT),
            detector=_one_value(_col(slides, "detector"), "detectors", _FILTER_HINT),
            encoder=_one_value(_col(slides, "encoder"), "encoders", _FILTER_HINT),
        )
        thresholds = [float(t) for t, ok in zip(self.threshold, self.scored, strict=True) if ok]
        # rows of versions before threshold_source were called at the stored threshold
        sources = {
            src or THRESHOLD_VALIDATION
            for src, ok in zip(_col(slides, "threshold_source"), self.scored, strict=True)
            if ok
        }
        if thresholds:
            low, high = min(thresholds), max(thresholds)
            self.model = self.model.model_copy(
                update={
                    "threshold": low if low == high else None,
                    "threshold_min": low,
                    "threshold_max": high,
                    "threshold_sources": sorted(sources),
                }
            )
        self.run_ids = sorted({str(r) for r in _col(slides, "run_id") if r is not None})
        self.n = n

    def _predicted(self, slides: pa.Table) -> list[str | None]:
        pred = _col(slides, "predicted_grade")
        probs = [_col(slides, c) for c in PROB_COLUMNS]
        out: list[str | None] = []
        for i, key in enumerate(self.keys):
            g = pred[i]
            if self.scored[i] and g is None:
                p = [col[i] for col in probs]
                if any(v is None for v in p):
                    raise EvaluationError(
                        f"slide {_key_name(key)} is {self.status[i]} but has no predicted_grade"
                    )
                g = GRADES[int(np.argmax(p))]
            if g is not None and g not in GRADES:
                raise EvaluationError(
                    f"slide {_key_name(key)}: predicted_grade {g!r} is not one of "
                    f"{', '.join(GRADES)}"
                )
            out.append(g)
        return out


def slide_outcomes(slides: pa.Table, truth: pa.Table) -> pa.Table:
    """One row per results slide: its key, true grade (null without truth), status, score,
    predicted grade and error, in the slides table's order (what the report's slide list and
    per-slide figures are chosen from)."""
    s = _Slides(slides)
    t = _truth_map(truth)
    return pa.table(
        {
            "center": [k[0] for k in s.keys],
            "batch": [k[1] for k in s.keys],
            "slide_id": [k[2] for k in s.keys],
            "truth": pa.array([t.get(k) for k in s.keys], pa.string()),
            "status": pa.array(s.status, pa.string()),
            "score": pa.array(s.score, pa.float64()),
            "predicted_grade": pa.array(s.predicted, pa.string()),
            "error": pa.array(s.error, pa.string()),
        }
    )


# --- metrics ------------------------------------------------------------------------------


def threshold_text(
    threshold: float | None,
    low: float | None,
    high: float | None,
    sources: list[str] | tuple[str, ...] = (),
    digits: int = 3,
) -> str:
    """How the reports write the slides' operating threshold: ``0.5 (stored with the
    classifier)`` when there is one, ``per center, 0.12–0.34 (carried to the center)`` when
    the slides were called at several; ``—`` when there is none."""
    if threshold is not None:
        text = f"{threshold:.{digits}g}"
    elif low is not None and high is not None:
        text = f"per center, {low:.{digits}g}–{high:.{digits}g}"
    else:
        return "—"
    words = [_SOURCE_WORDS.get(src, src) for src in sources]
    return text + (f" ({'; '.join(words)})" if words else "")


def _binary(
    y: np.ndarray, scores: np.ndarray, thresholds: np.ndarray, cfg: EvaluationConfig
) -> tuple[BinaryReport | None, RocCurve | None, str | None]:
    if len(y) == 0:
        return None, None, "no scored slides with ground truth"
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        which = "abnormal" if n_pos else "NILM"
        return (
            None,
            None,
            f"all {len(y)} scored slides are {which} in truth: AUC, sensitivity and "
            "specificity need both classes",
        )
    rep = binary_report(
        y,
        scores,
        thresholds,
        n_boot=cfg.n_boot,
        seed=cfg.seed,
        alpha=cfg.alpha,
        sensitivity_targets=cfg.sensitivity_targets,
    )
    fpr, tpr, _ = roc_curve(y, scores)
    roc = RocCurve(
        fpr=fpr.tolist(),
        tpr=tpr.tolist(),
        auc=rep.auc,
        threshold=rep.threshold,
        threshold_min=rep.threshold_min,
        threshold_max=rep.threshold_max,
        operating_fpr=1.0 - rep.specificity,
        operating_tpr=rep.sensitivity,
    )
    return rep, roc, None


def evaluate(
    slides: pa.Table,
    cells: pa.Table,
    truth: pa.Table,
    cell_truth: Mapping[SlideKey, SlideBoxes] | None = None,
    cfg: EvaluationConfig | None = None,
) -> Evaluation:
    """Evaluate screening results against ground truth: groups ``overall`` + one per center.

    ``slides`` and ``cells`` are the result tables with ``center``/``batch`` columns;
    ``truth`` has ``center, batch, slide_id, grade``; ``cell_truth`` maps (center, batch,
    slide_id) to annotated cells (``load_cell_labels``), or is None. The rules (failed slides
    counted not scored, inadequate scored and counted, each slide called at its own stored
    threshold, detection as AP of the kept cells at IoU ``cfg.iou``) are in the module
    docstring and :data:`RULES`.
    Raises :class:`EvaluationError` on results that cannot be evaluated as one model.
    """
    cfg = cfg or EvaluationConfig()
    s = _Slides(slides)
    t = _truth_map(truth)
    c = CellRows(cells)
    partitions = sorted({(k[0], k[1]) for k in s.keys})
    in_results = set(s.keys)
    centers = sorted({k[0] for k in s.keys})

    groups = []
    for name in (OVERALL, *centers):
        idx = [i for i, k in enumerate(s.keys) if name == OVERALL or k[0] == name]
        with_truth = [i for i in idx if s.keys[i] in t]
        positive = {i for i in with_truth if t[s.keys[i]] != NEGATIVE_GRADE}
        scored = [i for i in with_truth if s.scored[i]]
        inadequate = [i for i in with_truth if s.status[i] == STATUS_INADEQUATE]
        failed = [i for i in with_truth if s.status[i] == STATUS_FAILED]
        rejected = [i for i in with_truth if s.status[i] == STATUS_REJECTED]
        group_parts = {p for p in partitions if name == OVERALL or p[0] == name}
        not_in_results = sum(1 for k in t if (k[0], k[1]) in group_parts and k not in in_results)

        y = np.array([i in positive for i in scored], dtype=bool)
        sc = np.array([s.score[i] for i in scored], dtype=np.float64)
        thr = np.array([s.threshold[i] for i in scored], dtype=np.float64)
        rep, roc, reason = _binary(y, sc, thr, cfg)
        cm = confusion_matrix(
            [t[s.keys[i]] for i in scored], [s.predicted[i] for i in scored], GRADES
        )
        scored_keys = [s.keys[i] for i in idx if s.scored[i]]
        det, det_reason = detection_result(c, cell_truth, scored_keys, cfg.iou)
        groups.append(
            GroupResult(
                name=name,
                n_slides=len(with_truth),
                n_positive=len(positive),
                n_scored=len(scored),
                n_inadequate=len(inadequate),
                n_inadequate_positive=sum(1 for i in inadequate if i in positive),
                n_failed=len(failed),
                n_failed_positive=sum(1 for i in failed if i in positive),
                n_rejected=len(rejected),
                n_rejected_positive=sum(1 for i in rejected if i in positive),
                n_without_truth=len(idx) - len(with_truth),
                n_not_in_results=not_in_results,
                binary=rep,
                binary_reason=reason,
                roc=roc,
                confusion=ConfusionMatrix(counts=cm.tolist(), n=int(cm.sum())),
                detection=det,
                detection_reason=det_reason,
            )
        )
    return Evaluation(
        config=cfg,
        model=s.model,
        partitions=[f"{c}/{b}" for c, b in partitions],
        run_ids=s.run_ids,
        groups=groups,
    )
