"""The classifier's threshold folds: which fold each training slide falls in, and each
slide's score from the head fit without its fold, on which the operating threshold is chosen
(no head scores a slide it was trained on)."""

from __future__ import annotations

import numpy as np

from smartccs.models.mil import MILHead
from smartccs.screening.bags import SlideBag
from smartccs.screening.slides import predict
from smartccs.splits import assign_folds
from smartccs.taxonomy import GRADES


def slide_folds(
    n_folds: int, seed: int, bags: list[SlideBag], grades: list[int]
) -> tuple[np.ndarray, int] | None:
    """Each slide's fold (stratified by abnormal or not) and the number of folds; None when
    the slides cannot fill two folds with both classes."""
    y = np.asarray(grades) != GRADES.index("NILM")
    k = min(n_folds, int(y.sum()), int((~y).sum()))
    if k < 2:
        return None
    fold_of = assign_folds(((b.key, a) for b, a in zip(bags, y, strict=True)), k, seed)
    return np.array([fold_of[b.key] for b in bags]), k


def out_of_fold_scores(heads: list[MILHead], bags: list[SlideBag], folds: np.ndarray) -> np.ndarray:
    """Each slide's abnormal score (1 - P(NILM)) from ``heads[its fold]``."""
    out = np.full(len(bags), np.nan)
    for i, head in enumerate(heads):
        held = np.flatnonzero(folds == i)
        out[held] = 1 - predict(head, [bags[j] for j in held])[:, 0]
    return out
