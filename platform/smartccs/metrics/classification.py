"""Slide-level binary metrics: ROC, AUC with a bootstrap CI, sensitivity/specificity with
Wilson CIs, and the specificity a screen reaches at a given sensitivity.

Positive (label 1 / True) means abnormal: a slide that needs a cytologist's review. A slide is
predicted positive when its score is ``>= threshold``: one for all slides, or each slide's own
(a center's carried operating point). Every function validates its inputs and
raises ``ValueError`` naming the offending argument, because a silently broadcast or NaN-filled
metric in an evaluation report is worse than a crash.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import NormalDist

import numpy as np
from numpy.typing import ArrayLike
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "BinaryReport",
    "SpecificityAt",
    "binary_report",
    "bootstrap_auc_ci",
    "choose_threshold",
    "confusion_matrix",
    "roc_auc",
    "roc_curve",
    "sensitivity_specificity",
    "specificity_at_sensitivity",
    "wilson_ci",
]


def _labels(y: ArrayLike, name: str) -> np.ndarray:
    a = np.asarray(y)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} must not be empty")
    if a.dtype == bool:
        return a
    if a.dtype.kind not in "iuf":
        raise ValueError(f"{name} must hold 0/1 or bool labels, got dtype {a.dtype}")
    bad = ~((a == 0) | (a == 1))
    if bad.any():
        raise ValueError(f"{name} must hold only 0/1 or bool labels, found {a[bad][:5].tolist()}")
    return a == 1


def _scores(s: ArrayLike, name: str, n: int) -> np.ndarray:
    a = np.asarray(s)
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    a = a.astype(np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if len(a) != n:
        raise ValueError(f"{name} has length {len(a)} but y_true has length {n}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    return a


def _inputs(y_true: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = _labels(y_true, "y_true")
    return y, _scores(scores, "scores", len(y))


def _need_both_classes(y: np.ndarray, what: str) -> tuple[int, int]:
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        only = "positive (1)" if n_neg == 0 else "negative (0)"
        raise ValueError(f"{what} needs both classes in y_true, but all {len(y)} labels are {only}")
    return n_pos, n_neg


Threshold = float | ArrayLike
"""One threshold for every slide, or one per slide (a 1-D array as long as the labels)."""


def _threshold(t: Threshold, n: int | None = None, name: str = "threshold") -> float | np.ndarray:
    """``t`` as a float, or (given ``n``, the number of slides) a float64 array of one threshold
    per slide. Each must be a number: finite, or +inf (nothing positive) / -inf (everything
    positive); NaN, a non-number or an array of the wrong length is a ``ValueError``."""
    a = np.asarray(t)
    if a.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be a number or an array of numbers, got dtype {a.dtype}")
    a = a.astype(np.float64)
    if a.ndim == 0:
        if np.isnan(a):
            raise ValueError(f"{name} must be a number (finite or +/-inf), got NaN")
        return float(a)
    if a.ndim != 1 or n is None or len(a) != n:
        raise ValueError(f"{name} must be one number or one per slide ({n}), got shape {a.shape}")
    bad = np.flatnonzero(np.isnan(a))
    if len(bad):
        raise ValueError(
            f"{name} must be a number (finite or +/-inf) for every slide, got NaN at "
            f"position(s) {bad[:5].tolist()}"
        )
    return a


def _roc_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False/true positive counts at each distinct score, highest score first."""
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # last index of each distinct score
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    return fps, tps, s[last]


def roc_curve(y_true: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points ``(fpr, tpr, thresholds)``, one per distinct score, from (0, 0) to (1, 1).

    ``thresholds`` are decreasing; point ``i`` is the operating point of ``score >=
    thresholds[i]``. The first point has threshold ``+inf`` (nothing positive), so tied scores
    move the curve diagonally in one step instead of depending on input order.
    """
    y, s = _inputs(y_true, scores)
    n_pos, n_neg = _need_both_classes(y, "roc_curve")
    fps, tps, thresholds = _roc_counts(y, s)
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos], np.r_[np.inf, thresholds]


def _mann_whitney_auc(y: np.ndarray, s: np.ndarray, n_pos: int, n_neg: int) -> float:
    # Mann-Whitney U from mid-ranks: ties between a positive and a negative count 1/2.
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1
    mid_rank = first_rank + (counts - 1) / 2.0
    rank_sum = mid_rank[inverse.reshape(-1)][y].sum()
    u = rank_sum - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_auc(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve = P(score_pos > score_neg) + P(tie) / 2 (Mann-Whitney U).

    Raises ``ValueError`` when ``y_true`` holds only one class: AUC is undefined there.
    """
    y, s = _inputs(y_true, scores)
    n_pos, n_neg = _need_both_classes(y, "roc_auc")
    return _mann_whitney_auc(y, s, n_pos, n_neg)


def sensitivity_specificity(
    y_true: ArrayLike, scores: ArrayLike, threshold: Threshold
) -> tuple[float, float]:
    """``(sensitivity, specificity)`` with ``score >= threshold`` predicted positive
    (``threshold``: one number, or one per slide).

    Needs both classes: with no positives (or negatives) one of the two is undefined.
    """
    y, s = _inputs(y_true, scores)
    n_pos, n_neg = _need_both_classes(y, "sensitivity_specificity")
    pred = s >= _threshold(threshold, len(y))
    tp = int((pred & y).sum())
    tn = int((~pred & ~y).sum())
    return tp / n_pos, tn / n_neg


def choose_threshold(
    y_true: ArrayLike, scores: ArrayLike, *, min_sensitivity: float | None = None
) -> float:
    """The operating threshold: with ``min_sensitivity``, the highest threshold whose
    sensitivity is at least that (the most specific screen that still catches enough abnormal
    slides); otherwise the maximiser of Youden's J = sensitivity + specificity - 1 (the highest
    such threshold on ties).

    Always choose it on validation data, never on the test set: a threshold tuned on the test
    set makes the reported sensitivity/specificity optimistic. The result is one of the observed
    scores, so ``score >= threshold`` reproduces the chosen operating point on this data.
    """
    y, s = _inputs(y_true, scores)
    n_pos, n_neg = _need_both_classes(y, "choose_threshold")
    fps, tps, thresholds = _roc_counts(y, s)
    if min_sensitivity is not None:
        m = float(min_sensitivity)
        if not 0.0 < m <= 1.0:
            raise ValueError(f"min_sensitivity must be in (0, 1], got {min_sensitivity}")
        # Sensitivity rises as the threshold falls and reaches 1 at the lowest score, so a
        # match exists; tps / n_pos is computed exactly as sensitivity_specificity does.
        return float(thresholds[int(np.argmax(tps / n_pos >= m))])
    # J = tps/n_pos - fps/n_neg, compared in integers so exact ties go to the highest threshold.
    return float(thresholds[int(np.argmax(tps * n_neg - fps * n_pos))])


def specificity_at_sensitivity(y_true: ArrayLike, scores: ArrayLike, target: float) -> float:
    """The highest specificity among the ROC points whose sensitivity is ``>= target``.

    Screening is judged at a fixed sensitivity (how many abnormal slides a screen may miss),
    so this reads off the ROC how many NILM slides a threshold catching that share of the
    abnormal ones would clear. It is a property of the ranking alone, on the slides given (no
    threshold is carried over): the threshold achieving it is ``choose_threshold(...,
    min_sensitivity=target)`` on the same slides. Sensitivity 1 is always reached (at the
    lowest score), so the result is defined for every target in ``(0, 1]``.
    """
    y, s = _inputs(y_true, scores)
    n_pos, n_neg = _need_both_classes(y, "specificity_at_sensitivity")
    t = float(target)
    if not 0.0 < t <= 1.0:
        raise ValueError(f"target must be in (0, 1], got {target}")
    fps, tps, _ = _roc_counts(y, s)
    ok = tps / n_pos >= t  # the same float comparison choose_threshold makes
    return float((n_neg - fps[ok].min()) / n_neg)  # tn / n_neg, as sensitivity_specificity


def wilson_ci(successes: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score ``(1 - alpha)`` interval of a proportion ``successes / n``.

    Sensitivity and specificity are proportions over few slides and often 0 or 1 exactly; a
    percentile bootstrap (or the Wald interval) then collapses to a width of zero, claiming a
    certainty 6 slides cannot give. Wilson's interval stays honest there (6 of 6: 0.61-1.00)
    and is the usual one for diagnostic accuracy.
    """
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    if int(successes) != successes or not 0 <= successes <= n:
        raise ValueError(f"successes must be an integer in [0, n={n}], got {successes}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    z = NormalDist().inv_cdf(1.0 - alpha / 2.0)
    p, z2 = successes / n, z * z / n
    centre = (p + z2 / 2.0) / (1.0 + z2)
    half = z / (1.0 + z2) * float(np.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n)))
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def rates_at(
    y: np.ndarray, s: np.ndarray, threshold: Threshold, alpha: float = 0.05
) -> dict[str, float]:
    """Sensitivity and specificity of ``s >= threshold`` on boolean truth ``y`` (both classes
    present), each with its Wilson interval, named as the report models name them.
    ``threshold`` is one number, or one per slide (each slide called at its own)."""
    pred = s >= _threshold(threshold, len(y))
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    tp, tn = int((pred & y).sum()), int((~pred & ~y).sum())
    sens_ci, spec_ci = wilson_ci(tp, n_pos, alpha), wilson_ci(tn, n_neg, alpha)
    return {
        "sensitivity": tp / n_pos,
        "sensitivity_ci_low": sens_ci[0],
        "sensitivity_ci_high": sens_ci[1],
        "specificity": tn / n_neg,
        "specificity_ci_low": spec_ci[0],
        "specificity_ci_high": spec_ci[1],
    }


_MAX_CHUNK_ELEMENTS = 4_000_000


def _multiplicities(rng: np.random.Generator, n: int, b: int) -> np.ndarray:
    """(b, n) counts of how often each of n items is drawn in b resamples with replacement."""
    idx = rng.integers(0, n, size=(b, n)) + n * np.arange(b)[:, None]
    return np.bincount(idx.ravel(), minlength=b * n).reshape(b, n)


def _weighted_aucs(
    pos: np.ndarray, neg: np.ndarray, w_pos: np.ndarray, w_neg: np.ndarray
) -> np.ndarray:
    """AUC of each resample given as multiplicities ``w_pos`` (B, n_pos), ``w_neg`` (B, n_neg)
    over the original positive scores ``pos`` and sorted negative scores ``neg``.

    Each positive's Mann-Whitney wins are read off cumulative sums of the negative
    multiplicities at precomputed search positions: O(B * n), no per-resample sort.
    """
    lo = np.searchsorted(neg, pos, side="left")
    hi = np.searchsorted(neg, pos, side="right")
    cum = np.zeros((w_neg.shape[0], len(neg) + 1))
    np.cumsum(w_neg, axis=1, out=cum[:, 1:])
    below = cum[:, lo]  # resampled negatives strictly below each positive
    wins = below + 0.5 * (cum[:, hi] - below)  # ties count 1/2
    return np.einsum("bp,bp->b", w_pos, wins) / (w_pos.sum(axis=1) * w_neg.sum(axis=1))


def _resampled_aucs(
    y: np.ndarray, scorings: Sequence[np.ndarray], n_boot: int, alpha: float, seed: int, name: str
) -> np.ndarray:
    """(len(scorings), n_boot) AUCs of every scoring on the same stratified resamples."""
    n_pos, n_neg = _need_both_classes(y, name)
    if isinstance(n_boot, bool) or int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot}")
    n_boot = int(n_boot)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    # each scoring sorts the negatives its own way; its multiplicities follow that order
    orders = [np.argsort(s[~y], kind="stable") for s in scorings]
    rng = np.random.default_rng(seed)
    aucs = np.empty((len(scorings), n_boot))
    chunk = max(1, _MAX_CHUNK_ELEMENTS // max(n_pos, n_neg))  # bounds memory for big cohorts
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        w_neg = _multiplicities(rng, n_neg, b)
        w_pos = _multiplicities(rng, n_pos, b)
        for i, (s, order) in enumerate(zip(scorings, orders, strict=True)):
            neg = s[~y][order]
            aucs[i, start : start + b] = _weighted_aucs(s[y], neg, w_pos, w_neg[:, order])
    return aucs


def _percentiles(values: np.ndarray, alpha: float) -> tuple[float, float]:
    low, high = np.quantile(values, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def bootstrap_auc_ci(
    y_true: ArrayLike,
    scores: ArrayLike,
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile ``(1 - alpha)`` CI of the AUC from a stratified bootstrap.

    Positives and negatives are resampled separately (keeping their counts), so every resample
    has both classes and the AUC is always defined. Deterministic for a given ``seed``. A
    resample is drawn as multiplicities over the original slides, which lets all resamples be
    scored at once (1000 resamples of 1000 slides take a few tens of milliseconds).
    """
    y, s = _inputs(y_true, scores)
    aucs = _resampled_aucs(y, [s], n_boot, alpha, seed, "bootstrap_auc_ci")
    return _percentiles(aucs[0], alpha)


def bootstrap_auc_diff_ci(
    y_true: ArrayLike,
    scores_a: ArrayLike,
    scores_b: ArrayLike,
    *,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile CI of AUC(b) - AUC(a) on the same slides (a paired, stratified bootstrap).

    Two scorings of one cohort (with and without adaptation) share their slides' difficulty;
    resampling the slides once for both keeps that pairing, so the CI of the difference is far
    narrower than two separate AUC CIs would suggest, and honest about it.
    """
    y, a = _inputs(y_true, scores_a)
    _, b = _inputs(y_true, scores_b)
    aucs = _resampled_aucs(y, [a, b], n_boot, alpha, seed, "bootstrap_auc_diff_ci")
    return _percentiles(aucs[1] - aucs[0], alpha)


def within_group_auc_diff(
    groups: Sequence[str],
    y_true: ArrayLike,
    scores_a: ArrayLike,
    scores_b: ArrayLike,
    *,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean over groups of AUC(b) - AUC(a) inside each group, with its paired bootstrap CI.

    Pooled AUC over several centers also counts pairs across centers, so moving one center's
    scores up or down against another's changes it although no center ranks its own slides
    differently. Each center screens its own slides at its own threshold: what adaptation
    should change is the ranking inside a center. Slides are resampled within each group (and
    class), both scorings on the same resample. Returns ``(gain, low, high)``.
    """
    g = np.asarray(groups)
    y, a = _inputs(y_true, scores_a)
    _, b = _inputs(y_true, scores_b)
    if g.shape != y.shape:
        raise ValueError(f"groups must have one entry per slide ({len(y)}), got shape {g.shape}")
    names = sorted(set(g.tolist()))
    if not names:
        raise ValueError("within_group_auc_diff needs at least one slide")
    gains, diffs = [], []
    for i, name in enumerate(names):
        m = g == name
        aucs = _resampled_aucs(
            y[m], [a[m], b[m]], n_boot, alpha, seed + i, f"within_group_auc_diff (group {name})"
        )
        gains.append(roc_auc(y[m], b[m]) - roc_auc(y[m], a[m]))
        diffs.append(aucs[1] - aucs[0])
    low, high = _percentiles(np.mean(diffs, axis=0), alpha)
    return float(np.mean(gains)), low, high


def confusion_matrix(
    true_labels: Sequence[str] | ArrayLike,
    pred_labels: Sequence[str] | ArrayLike,
    labels: Sequence[str],
) -> np.ndarray:
    """Counts (K, K) in ``labels`` order: rows are the true label, columns the predicted one.

    A label outside ``labels`` is an error rather than silently dropped, so counts always sum
    to the number of samples.
    """
    labels = list(labels)
    if not labels:
        raise ValueError("labels must not be empty")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must be unique, got {labels}")
    index = {lab: i for i, lab in enumerate(labels)}
    if np.ndim(true_labels) != 1:
        raise ValueError(f"true_labels must be 1-D, got shape {np.shape(true_labels)}")
    if np.ndim(pred_labels) != 1:
        raise ValueError(f"pred_labels must be 1-D, got shape {np.shape(pred_labels)}")
    t = np.asarray(true_labels).tolist()
    p = np.asarray(pred_labels).tolist()
    if len(t) != len(p):
        raise ValueError(f"pred_labels has length {len(p)} but true_labels has length {len(t)}")
    for name, values in (("true_labels", t), ("pred_labels", p)):
        unknown = sorted({str(v) for v in values if v not in index})
        if unknown:
            raise ValueError(f"{name} has values not in labels {labels}: {unknown[:5]}")
    k = len(labels)
    ti = np.fromiter((index[v] for v in t), dtype=np.int64, count=len(t))
    pi = np.fromiter((index[v] for v in p), dtype=np.int64, count=len(p))
    return np.bincount(ti * k + pi, minlength=k * k).reshape(k, k)


class SpecificityAt(BaseModel):
    """Specificity read off the ROC at a target sensitivity (:func:`specificity_at_sensitivity`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sensitivity: float = Field(gt=0.0, le=1.0, description="the target sensitivity")
    specificity: float = Field(ge=0.0, le=1.0)


class BinaryReport(BaseModel):
    """Slide-level screening performance at the slides' operating threshold(s)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    auc: float = Field(ge=0.0, le=1.0)
    auc_ci_low: float = Field(ge=0.0, le=1.0)
    auc_ci_high: float = Field(ge=0.0, le=1.0)
    ci_level: float = Field(gt=0.0, lt=1.0, description="e.g. 0.95 for a 95% bootstrap CI")
    sensitivity: float = Field(ge=0.0, le=1.0)
    sensitivity_ci_low: float = Field(ge=0.0, le=1.0, description="Wilson score interval")
    sensitivity_ci_high: float = Field(ge=0.0, le=1.0)
    specificity: float = Field(ge=0.0, le=1.0)
    specificity_ci_low: float = Field(ge=0.0, le=1.0, description="Wilson score interval")
    specificity_ci_high: float = Field(ge=0.0, le=1.0)
    specificity_at: list[SpecificityAt] = Field(
        default_factory=list, description="read off the ROC at target sensitivities"
    )
    threshold: float | None = Field(
        description="score >= threshold is predicted abnormal; None when the slides' differ"
    )
    threshold_min: float | None = Field(default=None, description="the slides' lowest threshold")
    threshold_max: float | None = Field(default=None, description="the slides' highest")
    n_pos: int = Field(ge=1)
    n_neg: int = Field(ge=1)


def binary_report(
    y_true: ArrayLike,
    scores: ArrayLike,
    threshold: Threshold,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    sensitivity_targets: Sequence[float] = (0.90, 0.95),
) -> BinaryReport:
    """AUC with its stratified-bootstrap CI, sensitivity/specificity at ``threshold`` (which
    should come from :func:`choose_threshold` on validation data) with Wilson CIs, and the
    specificity at each of ``sensitivity_targets`` read off this data's ROC.

    ``threshold`` is one number, or one per slide: each slide is then called at its own (slides
    of several centers, each at its center's). The report's ``threshold`` is the common value,
    or None when they differ; ``threshold_min`` / ``threshold_max`` give their range."""
    y, s = _inputs(y_true, scores)
    n_pos, n_neg = _need_both_classes(y, "binary_report")
    threshold = _threshold(threshold, len(y))
    t_low, t_high = float(np.min(threshold)), float(np.max(threshold))
    low, high = bootstrap_auc_ci(y, s, n_boot=n_boot, alpha=alpha, seed=seed)
    return BinaryReport(
        auc=roc_auc(y, s),
        auc_ci_low=low,
        auc_ci_high=high,
        ci_level=1.0 - alpha,
        **rates_at(y, s, threshold, alpha),
        specificity_at=[
            SpecificityAt(sensitivity=t, specificity=specificity_at_sensitivity(y, s, t))
            for t in sensitivity_targets
        ],
        threshold=t_low if t_low == t_high else None,
        threshold_min=t_low,
        threshold_max=t_high,
        n_pos=n_pos,
        n_neg=n_neg,
    )
