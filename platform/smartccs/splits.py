"""Deterministic train / validation / test assignment of slides.

Slides are split, not tiles: tiles of one slide are never on both sides. Within each stratum
(center x normal/abnormal) slides are ordered by a hash of their identity and the seed, and the
first ``round(n * test)`` go to test, the next ``round(n * val)`` to validation: every center
keeps both classes in every split even when it has only a handful of slides, and the same
cohort with the same seed always splits the same way, whatever the order it is listed in.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from smartccs.batches import BatchRef
from smartccs.ids import SlideKey

Split = Literal["train", "val", "test"]


class SplitConfig(BaseModel):
    """Fractions of slides per split (the rest is ``train``) and the seed of the assignment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    val: float = Field(default=0.2, ge=0, lt=1)
    test: float = Field(default=0.25, ge=0, lt=1)
    seed: int = 0

    @model_validator(mode="after")
    def _leaves_training(self) -> SplitConfig:
        if self.val + self.test >= 1:
            raise ValueError("val + test must leave slides for training (sum < 1)")
        return self


def _rank(center: str, batch: str, slide_id: str, seed: int) -> bytes:
    return hashlib.sha256(f"{seed}:{center}:{batch}:{slide_id}".encode()).digest()


def assign_splits(
    slides: Iterable[tuple[str, str, str, bool]], cfg: SplitConfig
) -> dict[SlideKey, Split]:
    """(center, batch, slide_id, abnormal) rows -> split of each slide, stratified."""
    strata: dict[tuple[str, bool], list[SlideKey]] = defaultdict(list)
    for center, batch, slide_id, abnormal in slides:
        strata[(center, bool(abnormal))].append((center, batch, slide_id))
    out: dict[SlideKey, Split] = {}
    for keys in strata.values():
        keys.sort(key=lambda k: _rank(*k, cfg.seed))
        n_test = round(len(keys) * cfg.test)
        n_val = round(len(keys) * cfg.val)
        for i, key in enumerate(keys):
            out[key] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


def assign_folds(
    keys: Iterable[tuple[SlideKey, bool]], k: int, seed: int = 0
) -> dict[SlideKey, int]:
    """(slide key, abnormal) -> fold in ``0..k-1``, dealt round-robin within each stratum
    (center x normal/abnormal) in the same hashed order as :func:`assign_splits`, so every fold
    gets its share of each center's abnormal and NILM slides."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    strata: dict[tuple[str, bool], list[SlideKey]] = defaultdict(list)
    for key, abnormal in keys:
        strata[(key[0], bool(abnormal))].append(key)
    out: dict[SlideKey, int] = {}
    offset = 0
    for stratum in sorted(strata):
        members = sorted(strata[stratum], key=lambda key: _rank(*key, seed))
        for i, key in enumerate(members):
            out[key] = (offset + i) % k
        offset += len(members)  # the next stratum starts where this one left off: even folds
    return out


def split_rows(refs: list[BatchRef], cfg: SplitConfig) -> dict[Split, list[dict[str, Any]]]:
    """Slide rows (:func:`smartccs.data.tiles.slide_rows`) of the batches, by split."""
    from smartccs.data.tiles import slide_rows

    grades = {(r.center, r.batch, s.slide_id): s.grade for r in refs for s in r.manifest.slides}
    where = assign_splits(
        ((c, b, s, (g or "NILM") != "NILM") for (c, b, s), g in grades.items()), cfg
    )
    out: dict[Split, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
    for row in slide_rows(refs):
        out[where[(row["center"], row["batch"], row["slide_id"])]].append(row)
    return out
