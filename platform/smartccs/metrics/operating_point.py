"""The screening operating point a classifier ships with.

Screening is judged on sensitivity first: a threshold is chosen on the validation slides as the
highest one that still catches ``target_sensitivity`` of the abnormal ones, and the card keeps
what it reached there (sensitivity, specificity, with Wilson CIs, and the slide counts). The
test slides never choose it, so what evaluation reports at this threshold is not optimistic.

With few abnormal validation slides the target cannot be told apart from catching all of them:
at ``n`` positives a screen misses in steps of ``1/n``, so a target below 1 first allows a miss
at ``n >= 1 / (1 - target)`` (10 for 0.90, 20 for 0.95). Below that the threshold is the lowest
abnormal validation score, set by one slide; :attr:`OperatingPoint.resolved` is False and
:attr:`OperatingPoint.note` says so.
"""

from __future__ import annotations

import math

from numpy.typing import ArrayLike
from pydantic import BaseModel, ConfigDict, Field

from smartccs.metrics.classification import _inputs, choose_threshold, rates_at

__all__ = ["OperatingPoint", "min_positives", "operating_point"]


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

    def describe(self) -> str:
        """One line for logs and reports."""
        return (
            f"threshold {self.threshold:.4g} chosen on {self.n_slides} validation slides "
            f"({self.n_pos} abnormal) for sensitivity >= {self.target_sensitivity:.2f}: there "
            f"sensitivity {self.sensitivity:.2f}, specificity {self.specificity:.2f}"
        )


def min_positives(target_sensitivity: float) -> int:
    """Abnormal slides needed before a screen at ``target_sensitivity`` may miss one."""
    t = float(target_sensitivity)
    if not 0.0 < t <= 1.0:
        raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
    return 1 if t == 1.0 else math.ceil(1.0 / (1.0 - t) - 1e-9)


def operating_point(
    y_true: ArrayLike, scores: ArrayLike, target_sensitivity: float, *, alpha: float = 0.05
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
            "by one slide; add validation slides (split.val)"
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
    )
