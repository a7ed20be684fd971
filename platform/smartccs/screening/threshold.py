"""The operating point carried to a center: the threshold a slide is called at.

The threshold stored with the classifier was chosen where the validation slides' scores lay. At
a center with another scanner, stain or preparation the same cells score differently: in the
demo the NILM slides of one external center scored as high as the abnormal slides of the
internal ones, so the stored threshold called every slide there positive. What stays put is the
operating point: the place of the threshold between the two classes' score distributions.

The center's unlabelled slides say where its distributions moved. On the logit scale a shift in
what the detector sees moves every slide's evidence by about the same amount, so the center's
scores are modelled as the validation mixture (:class:`ScoreReference`: one normal per class)
moved by an affine map ``z -> a z + b``, with its own abnormal share ``pi``. The posterior of
the map and the share is computed on a grid (no optimiser to get stuck), with priors that keep
a center near the validation scale until its slides say otherwise:

* ``b ~ N(0, shift_sd)``: a shift of 1 on the logit scale multiplies every slide's odds by e;
* ``log a ~ N(0, scale_sd)``: the spread of scores changes less than their place;
* ``logit(pi) ~ N(logit(prevalence), prevalence_sd)``: the abnormal share of a screening
  population is known within a factor of a few (a real program: 3-10 %; a referral clinic:
  more); ``prevalence`` defaults to the validation slides' share and should be set to the
  program's for real screening.

The threshold is the posterior median of ``a * logit(t) + b`` (the share integrated out), back
on the score scale: with a few dozen slides many maps explain the scores almost equally well,
and the single most likely one can sit on either side of a slide. With fewer than
``min_slides`` scored slides at the center (or a card without a score reference) the stored
threshold is used. The slides are the ones screened at that center with the same classifier
and adaptation method, from its committed results, plus the batch being published: what the
platform has already seen there, never a label.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import ArrayLike
from pydantic import BaseModel, ConfigDict, Field

from smartccs.metrics.operating_point import OperatingPoint, ScoreReference, logit
from smartccs.results.schema import (
    STATUS_INADEQUATE,
    STATUS_SCREENED,
    THRESHOLD_CENTER,
    THRESHOLD_VALIDATION,
)
from smartccs.store import Store

log = logging.getLogger(__name__)

_SHIFTS = np.linspace(-8.0, 8.0, 321)  # 8 prior sds: never the edge that decides
_LOG_SCALES = np.linspace(-0.7, 0.7, 29)
_SHARES = np.linspace(0.01, 0.99, 99)
_CHUNK = 64


class ThresholdConfig(BaseModel):
    """How a slide's threshold is chosen at its center (``screening.threshold``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    carry: Literal["center", "stored"] = Field(
        default="center",
        description="center: carry the stored operating point to each center through its "
        "unlabelled score distribution; stored: the classifier's threshold everywhere",
    )
    min_slides: int = Field(
        default=6, ge=2, description="scored slides a center needs before its own threshold"
    )
    max_slides: int = Field(
        default=2000, ge=2, description="the center's most recent scored slides it uses"
    )
    shift_sd: float = Field(default=1.0, gt=0, description="prior sd of the logit shift")
    scale_sd: float = Field(default=0.25, gt=0, description="prior sd of the log scale")
    prevalence: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="expected abnormal share of a center's slides; None: the validation share",
    )
    prevalence_sd: float = Field(
        default=1.0, gt=0, description="prior sd of the center's abnormal share, logit scale"
    )


class AppliedThreshold(BaseModel):
    """The threshold one batch's slides are called at, and where it came from."""

    model_config = ConfigDict(frozen=True)

    value: float
    source: str = Field(description="results.schema.THRESHOLD_SOURCES")
    slides: int | None = Field(default=None, description="center slides it was carried with")
    shift: float = 0.0
    scale: float = 1.0
    prevalence: float | None = None

    def describe(self) -> str:
        if self.source != THRESHOLD_CENTER:
            return f"threshold {self.value:.4g} (stored with the classifier)"
        return (
            f"threshold {self.value:.4g} carried to the center from {self.slides} slides "
            f"(logit scale x{self.scale:.2f} shift {self.shift:+.2f}, abnormal share "
            f"{self.prevalence:.2f})"
        )


def _normal_logpdf(x: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    return -0.5 * ((x - mean) / sd) ** 2 - np.log(sd) - 0.5 * math.log(2 * math.pi)


def _log_posterior(z: np.ndarray, ref: ScoreReference, cfg: ThresholdConfig) -> np.ndarray:
    """Unnormalised log posterior of (log a, b, pi) on the grid, shape (scales, shifts, shares)."""
    prior_share = cfg.prevalence if cfg.prevalence is not None else ref.prevalence
    share_logit = np.log(_SHARES / (1 - _SHARES))
    share_prior = -0.5 * ((share_logit - math.log(prior_share / (1 - prior_share)))
                          / cfg.prevalence_sd) ** 2  # fmt: skip
    b, pi = _SHIFTS[:, None, None], _SHARES[None, :, None]
    out = np.empty((len(_LOG_SCALES), len(_SHIFTS), len(_SHARES)))
    for i, log_a in enumerate(_LOG_SCALES):
        a = math.exp(log_a)
        ll = np.zeros((len(_SHIFTS), len(_SHARES)))
        for j in range(0, len(z), _CHUNK):  # bounded memory for a long history
            x = z[j : j + _CHUNK]
            nilm = _normal_logpdf(x, a * ref.nilm_mean + b, np.asarray(a * ref.nilm_sd))
            abn = _normal_logpdf(x, a * ref.abnormal_mean + b, np.asarray(a * ref.abnormal_sd))
            ll += np.logaddexp(np.log1p(-pi) + nilm, np.log(pi) + abn).sum(-1)
        out[i] = (ll - 0.5 * (_SHIFTS[:, None] / cfg.shift_sd) ** 2
                  - 0.5 * (log_a / cfg.scale_sd) ** 2 + share_prior[None, :])  # fmt: skip
    return out


def carry(
    z: np.ndarray, ref: ScoreReference, threshold_logit: float, cfg: ThresholdConfig
) -> tuple[float, float, float, float]:
    """The carried logit threshold, the posterior median of ``a * threshold_logit + b`` over
    every (a, b, pi) the center's logit scores ``z`` allow (the share integrated out), and the
    posterior means of ``(b, a, pi)`` for the log. The median, not the single most likely
    (a, b, pi): with a few dozen slides many maps explain the scores almost equally well."""
    post = _log_posterior(z, ref, cfg)
    w = np.exp(post - post.max())
    w /= w.sum()
    scales = np.exp(_LOG_SCALES)
    carried = scales[:, None] * threshold_logit + _SHIFTS[None, :]  # (scales, shifts)
    w_ab = w.sum(-1)
    order = np.argsort(carried, axis=None)
    cdf = np.cumsum(w_ab.ravel()[order])
    median = float(carried.ravel()[order][min(np.searchsorted(cdf, 0.5), len(cdf) - 1)])
    shift = float((w_ab.sum(0) * _SHIFTS).sum())
    scale = float((w_ab.sum(1) * scales).sum())
    share = float((w.sum((0, 1)) * _SHARES).sum())
    return median, shift, scale, share


def carried_threshold(
    op: OperatingPoint | None, stored: float, scores: ArrayLike, cfg: ThresholdConfig
) -> AppliedThreshold:
    """The threshold for a center whose scored slides so far (this batch included) have
    ``scores``: the stored one carried by the center's fitted map, or the stored one itself."""
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)][-cfg.max_slides :]
    if cfg.carry == "stored" or op is None or op.reference is None or len(s) < cfg.min_slides:
        return AppliedThreshold(value=stored, source=THRESHOLD_VALIDATION)
    carried, b, a, pi = carry(logit(s), op.reference, float(logit(stored)), cfg)
    value = float(1.0 / (1.0 + math.exp(-carried)))
    return AppliedThreshold(
        value=value, source=THRESHOLD_CENTER, slides=len(s), shift=b, scale=a, prevalence=pi
    )


def center_history(
    store: Store, center: str, batch: str, classifier: str, adaptation: str | None
) -> np.ndarray:
    """Scores of the slides already screened at ``center`` (committed results, any run) with
    this classifier and adaptation method, except batch ``batch`` (its re-run replaces it),
    oldest first."""
    from smartccs.results.tables import read_table

    rows = read_table(store, "slides", centers=[center])
    if rows.num_rows == 0:
        return np.zeros(0)
    scored = pa.array([STATUS_SCREENED, STATUS_INADEQUATE], pa.string())
    keep = pc.and_(
        pc.and_(pc.not_equal(rows["batch"], batch), pc.equal(rows["classifier"], classifier)),
        pc.is_in(rows["status"], value_set=scored),
    )
    rows = rows.filter(keep).sort_by("screened_at")  # oldest first: max_slides keeps the newest
    methods = [None if a is None else a.split(":", 1)[0] for a in rows["adaptation"].to_pylist()]
    want = None if adaptation is None else adaptation.split(":", 1)[0]
    scores = rows["score"].to_numpy(zero_copy_only=False).astype(np.float64)
    return scores[[m == want for m in methods]] if len(scores) else scores
