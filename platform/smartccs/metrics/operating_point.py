"""The screening operating point a classifier ships with.

Screening is judged on sensitivity first: a threshold is chosen on the validation slides as the
highest one that still catches ``target_sensitivity`` of the abnormal ones, and the card keeps
what it reached there (sensitivity, specificity, with Wilson CIs, and the slide counts). The
test slides never choose it, so what evaluation reports at this threshold is not optimistic.

With few abnormal validation slides the target cannot be told apart from catching all of them:
at ``n`` positives a screen misses in steps of ``1/n``, so a target below 1 first allows a miss
at ``n >= 1 / (1 - target)`` (10 for 0.90, 20 for 0.95). Below that the threshold is the lowest
abnormal validation score, set by one slide; :attr:`OperatingPoint.resolved` is False and
:attr:`OperatingPoint.note` says so. Training therefore chooses it, by default, on out-of-fold
scores of every training and validation slide (``ClassifierConfig.threshold_folds``).

The card also keeps the class score distributions the threshold was chosen on
(:class:`ScoreReference`): that is what lets ``screening.threshold`` carry the operating point to
a center whose scores sit elsewhere.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike
from pydantic import BaseModel, ConfigDict, Field

from smartccs.metrics.classification import _inputs, choose_threshold, rates_at

__all__ = [
    "OperatingPoint",
    "ScoreReference",
    "logit",
    "min_positives",
    "operating_point",
    "score_reference",
]

LOGIT_CLIP = 1e-4
"""Scores are clipped to [1e-4, 1 - 1e-4] before the logit: a softmax saturates in float32
long before that, and one saturated slide must not stretch a class's spread to infinity."""
MIN_LOGIT_SD = 0.25


def logit(scores: ArrayLike) -> np.ndarray:
    """log(s / (1 - s)) of clipped scores: where shifts between centers are additive."""
    s = np.clip(np.asarray(scores, dtype=np.float64), LOGIT_CLIP, 1.0 - LOGIT_CLIP)
    return np.log(s / (1.0 - s))


class ScoreReference(BaseModel):
    """Where the validation slides' scores lay, per class, on the logit scale: the template a
    center's unlabelled scores are matched against to carry the operating point there
    (``screening.threshold``). A normal per class is all a few dozen slides can support."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    nilm_mean: float
    nilm_sd: float = Field(gt=0.0)
    abnormal_mean: float
    abnormal_sd: float = Field(gt=0.0)
    prevalence: float = Field(gt=0.0, lt=1.0, description="abnormal share of those slides")
    n_nilm: int = Field(ge=1)
    n_abnormal: int = Field(ge=1)


def score_reference(y_true: ArrayLike, scores: ArrayLike) -> ScoreReference:
    """Mean and spread of each class's logit score (spread floored at 0.25: two slides of one
    class must not make a needle)."""
    y, s = _inputs(y_true, scores)
    z = logit(s)
    if y.all() or not y.any():
        raise ValueError("score_reference needs both classes")

    def sd(v: np.ndarray) -> float:
        return max(float(v.std(ddof=1)) if len(v) > 1 else 0.0, MIN_LOGIT_SD)

    return ScoreReference(
        nilm_mean=float(z[~y].mean()),
        nilm_sd=sd(z[~y]),
        abnormal_mean=float(z[y].mean()),
        abnormal_sd=sd(z[y]),
        prevalence=float(y.mean()),
        n_nilm=int((~y).sum()),
        n_abnormal=int(y.sum()),
    )


class OperatingPoint(BaseModel):
    """The threshold chosen on validation slides for a target sensitivity, and what it did
    there. Stored in the classifier card's head as ``operating_point``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target_sensitivity: float = Field(gt=0.0, le=1.0)
    threshold: float = Field(description="score >= threshold is predicted abnormal")
    sensitivity: float = Field(ge=0.0, le=1.0, description="on the validation slides")
    sensitivity_ci_low: float = Field(ge=0.0, le=1.0)
    sensitivity_ci_high: float = Field(ge=0.0, le=1.0)
    specificity: float = Field(ge=0.0, le=1.0, description="on the validation slides")
    specificity_ci_low: float = Field(ge=0.0, le=1.0)
    specificity_ci_high: float = Field(ge=0.0, le=1.0)
    ci_level: float = Field(gt=0.0, lt=1.0)
    n_slides: int = Field(ge=2, description="validation slides it was chosen on")
    n_pos: int = Field(ge=1)
    n_neg: int = Field(ge=1)
    resolved: bool = Field(description="enough abnormal validation slides to miss one")
    note: str | None = Field(default=None, description="why the target is not resolved")
    chosen_on: str = Field(
        default="validation split",
        description="which scores chose it: the validation split, or out-of-fold scores",
    )
    reference: ScoreReference | None = Field(
        default=None, description="the class score distributions it was chosen on"
    )

    def describe(self) -> str:
        """One line for logs and reports."""
        return (
            f"threshold {self.threshold:.4g} chosen on {self.n_slides} slides ({self.n_pos} "
            f"abnormal; {self.chosen_on} scores) for sensitivity >= "
            f"{self.target_sensitivity:.2f}: there "
            f"sensitivity {self.sensitivity:.2f}, specificity {self.specificity:.2f}"
        )


def min_positives(target_sensitivity: float) -> int:
    """Abnormal slides needed before a screen at ``target_sensitivity`` may miss one."""
    t = float(target_sensitivity)
    if not 0.0 < t <= 1.0:
        raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
    return 1 if t == 1.0 else math.ceil(1.0 / (1.0 - t) - 1e-9)


def operating_point(
    y_true: ArrayLike,
    scores: ArrayLike,
    target_sensitivity: float,
    *,
    alpha: float = 0.05,
    chosen_on: str = "validation split",
) -> OperatingPoint:
    """Choose the threshold on these (validation) slides: the highest score whose sensitivity is
    at least ``target_sensitivity`` (the most specific screen that still catches enough), and
    measure it there. Raises ``ValueError`` when the slides lack either class."""
    need = min_positives(target_sensitivity)
    y, s = _inputs(y_true, scores)
    threshold = choose_threshold(y, s, min_sensitivity=target_sensitivity)
    n_pos = int(y.sum())
    resolved = n_pos >= need
    note = None
    if not resolved:
        note = (
            f"only {n_pos} abnormal validation slides (sensitivity {target_sensitivity:.2f} "
            f"needs {need} to allow one miss): the threshold is the lowest abnormal score, set "
            "by one slide; add validation slides (split.val) or threshold_folds"
        )
    return OperatingPoint(
        target_sensitivity=target_sensitivity,
        threshold=threshold,
        **rates_at(y, s, threshold, alpha),
        ci_level=1.0 - alpha,
        n_slides=len(y),
        n_pos=n_pos,
        n_neg=len(y) - n_pos,
        resolved=resolved,
        note=note,
        chosen_on=chosen_on,
        reference=score_reference(y, s),
    )
