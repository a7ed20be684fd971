"""One center's adaptive classifier: load its state, adapt on a batch, predict, save.

The batch job keeps one ``CenterAdapter`` per center for a run; the service keeps them in a
multiplexed deployment (LRU per replica). Both call the same methods, so a center adapts the
same way whichever door its batches come through, and both read and write the same versioned
state in the store.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import numpy as np

from smartccs.adaptation.config import AdaptConfig, Method
from smartccs.adaptation.contrastive import adapt_step, relative_drift
from smartccs.adaptation.state import (
    CenterState,
    DetectorAdaptation,
    load_state,
    save_state,
    source_state,
    state_name,
)
from smartccs.errors import StoreError
from smartccs.ids import batch_key
from smartccs.models.artifacts import latest_version
from smartccs.screening.bags import SlideBag
from smartccs.screening.slides import SlideClassifier, predict
from smartccs.store import Store

log = logging.getLogger(__name__)


class CenterAdapter:
    """A classifier adapted to one center, carried across that center's batches."""

    def __init__(self, store: Store, classifier: SlideClassifier, center: str, cfg: AdaptConfig):
        self.store, self.classifier, self.center, self.cfg = store, classifier, center, cfg
        self._source = {k: v.detach().clone() for k, v in classifier.head.state_dict().items()}
        self.state = self._load()

    def _load(self) -> CenterState:
        if self.cfg.persist:
            state = load_state(self.store, self.center, self.classifier.ref, self._source)
        else:
            state = source_state(self.center, self.classifier.ref, self._source)
        state.method = self.cfg.method
        return state

    def refresh(self) -> None:
        """Reload when another process (the other door, a rollback) moved the center on."""
        if not self.cfg.persist:
            return
        try:
            latest = latest_version(self.store, state_name(self.center))
        except StoreError:  # no state yet
            latest = None
        if latest != self.state.version:
            self.state = self._load()

    def prepare(self, batch: str) -> tuple[DetectorAdaptation, bool]:
        """What the detector stage runs with (tent's norms, the center's stain), and whether
        ``batch`` is already folded into the state (a re-run adapts nothing)."""
        detector = DetectorAdaptation(norms=self.state.norms, stain=self.state.stain)
        return detector, batch_key(self.center, batch) in self.state.batches

    def _heads(self):
        student = copy.deepcopy(self.classifier.head)
        teacher = copy.deepcopy(self.classifier.head)
        student.load_state_dict(self.state.student)
        teacher.load_state_dict(self.state.teacher)
        return student, teacher

    def adapt(
        self,
        batch: str,
        bags: Sequence[SlideBag],
        detector: DetectorAdaptation | None = None,
        method: Method | None = None,
    ) -> tuple[np.ndarray, str, dict[str, float]]:
        """Adapt on one batch and predict it: (N, 7) probabilities, the adaptation label for
        the slides table, and the step's statistics. ``detector``: the norms and stain the
        batch was screened with, kept in the new state; ``method`` overrides the config's
        for this batch (a service request may choose)."""
        key = batch_key(self.center, batch)
        state = self.state
        state.method = method = method or self.cfg.method
        student, teacher = self._heads()
        stats: dict[str, float] = {}
        repeat = key in state.batches  # a re-run: predict, but never adapt twice on it
        if method == "smartccs" and not repeat:
            stats = adapt_step(student, teacher, bags, self.cfg)
            state.drift = stats["drift"] = relative_drift(
                dict(student.named_parameters()), self._source
            )
            if state.drift > self.cfg.max_drift:
                log.warning(
                    "center %s: MIL head drifted %.3f (> %.3f) on %s: reset to the source",
                    self.center,
                    state.drift,
                    self.cfg.max_drift,
                    key,
                )
                student.load_state_dict(self._source)
                teacher.load_state_dict(self._source)
                state.resets += 1
                state.drift, stats["reset"] = 0.0, 1.0
            state.student = {k: v.detach().clone() for k, v in student.state_dict().items()}
            state.teacher = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
        if detector is not None and not repeat:
            state.norms = {k: v.detach().clone() for k, v in detector.norms.items()}
            state.stain = detector.stain
        probs = (predict(student, bags) + predict(teacher, bags)) / 2  # the reference's mean
        if not repeat:
            state.batches = [*state.batches, key]
            if self.cfg.persist:
                save_state(self.store, state, self.classifier.card, {"last_step": stats})
        log.info(
            "center %s: %s on %s -> %s %s",
            self.center,
            method,
            key,
            state.label,
            {k: round(v, 4) for k, v in stats.items()},
        )
        return probs, state.label, stats


class LocalAdapters:
    """The batch job's adapters: one ``CenterAdapter`` per center, in this process."""

    def __init__(self, store: Store, classifier: SlideClassifier, cfg: AdaptConfig):
        self.store, self.classifier, self.cfg = store, classifier, cfg
        self._centers: dict[str, CenterAdapter] = {}

    def _get(self, center: str) -> CenterAdapter:
        if center not in self._centers:
            self._centers[center] = CenterAdapter(self.store, self.classifier, center, self.cfg)
        return self._centers[center]

    def prepare(self, center: str, batch: str) -> tuple[DetectorAdaptation, bool]:
        return self._get(center).prepare(batch)

    def adapt(
        self,
        center: str,
        batch: str,
        bags: list[SlideBag],
        detector: DetectorAdaptation | None,
    ) -> tuple[np.ndarray, str, dict[str, float]]:
        return self._get(center).adapt(batch, bags, detector, self.cfg.method)
