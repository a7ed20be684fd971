"""The service's worker: takes submitted batches from the store's queue and screens them.

A worker runs the same ``screen_batches`` as the batch job, one batch at a time, with the
center's adaptation done by whatever ``CenterAdapters`` it is given (the multiplexed deployment
in the service). Progress is written to the batch's record as each slide is read, with the status
the slides table will give it (``slide_status``), and the committed rows' own statuses once the
batch is published; a heartbeat thread keeps the record fresh during long slides so no other
worker takes the batch over.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

import numpy as np

from smartccs.adaptation.config import Method
from smartccs.adaptation.state import DetectorAdaptation
from smartccs.batches import load_batch
from smartccs.engine.config import ScreeningConfig
from smartccs.engine.screen import screen_batches
from smartccs.models.refs import ModelRef, pin
from smartccs.results.schema import (
    STATUS_FAILED,
    STATUS_INADEQUATE,
    STATUS_REJECTED,
    STATUS_SCREENED,
)
from smartccs.results.tables import read_table
from smartccs.screening.adequacy import AdequacyConfig
from smartccs.screening.bags import SlideBag
from smartccs.screening.slides import estimated_squamous, required_squamous
from smartccs.service.config import ServiceConfig
from smartccs.service.records import BatchQueue, BatchRecord, SlideProgress
from smartccs.store import open_store

log = logging.getLogger(__name__)


def adapter_key(center: str, classifier: ModelRef) -> str:
    """The multiplexed model id of a center's adapted classifier."""
    return f"{center}|{classifier.label}"


def parse_adapter_key(key: str) -> tuple[str, ModelRef]:
    center, _, model = key.partition("|")
    return center, ModelRef.parse(model)


def slide_status(bag: SlideBag, adequacy: AdequacyConfig) -> str:
    """The status the slides table gives a screened slide (``screening.slides``' rule), for
    the record's progress while the batch runs: no tile read is failed, not cytology is
    rejected, and a read slide is inadequate below the pro-rated squamous minimum."""
    if bag.rejected:
        return STATUS_REJECTED
    if not bag.ok:
        return STATUS_FAILED
    adequate = estimated_squamous(bag) >= required_squamous(adequacy, bag.slide_area_mm2)
    return STATUS_SCREENED if adequate else STATUS_INADEQUATE


class RemoteAdapters:
    """``CenterAdapters`` served by the multiplexed ``Adapters`` deployment: one call per
    batch, routed to the replica that already holds the center's state."""

    def __init__(self, handle: Any, classifier: ModelRef, method: Method):
        self.handle, self.classifier, self.method = handle, classifier, method

    def _center(self, center: str):
        return self.handle.options(multiplexed_model_id=adapter_key(center, self.classifier))

    def prepare(self, center: str, batch: str) -> tuple[DetectorAdaptation, bool]:
        return self._center(center).prepare.remote(batch).result()

    def adapt(
        self, center: str, batch: str, bags: list[SlideBag], detector: DetectorAdaptation | None
    ) -> tuple[np.ndarray, str, dict[str, float]]:
        return self._center(center).adapt.remote(batch, bags, detector, self.method).result()


class Worker:
    """Claims queued batches and screens them; ``run_forever`` is a replica's loop."""

    def __init__(self, cfg: ServiceConfig, adapters_for: Any = None, name: str | None = None):
        self.cfg = cfg
        self.store = open_store(cfg.store)
        self.queue = BatchQueue(self.store, cfg.lease_s)
        self.adapters_for = adapters_for  # (ModelRef, method) -> CenterAdapters; None: in-process
        self.name = name or f"worker-{uuid.uuid4().hex[:8]}"
        self.wakeup = threading.Event()
        self._lock = threading.Lock()

    def run_forever(self) -> None:
        while True:
            try:
                if not self.step():
                    self.wakeup.wait(self.cfg.poll_s)
                    self.wakeup.clear()
            except Exception:  # the loop must outlive any one batch or store hiccup
                log.exception("%s: worker step failed", self.name)
                time.sleep(self.cfg.poll_s)

    def step(self) -> bool:
        """Take and screen one batch; False when there was none to take."""
        for record in self.queue.claimable():
            claimed = self.queue.claim(record, self.name)
            if claimed is not None:
                self.run(claimed)
                return True
        return False

    def _save(self, record: BatchRecord) -> None:
        with self._lock:
            record.heartbeat = time.time()
            self.queue.save(record)

    def _try_save(self, record: BatchRecord) -> None:
        """A heartbeat or progress write: best effort. One that fails (the store out for longer
        than its clients retry) is logged, and the next one carries the state; letting it raise
        would stop the heartbeat for good, and another worker would take the batch over while
        this one still screens it."""
        try:
            self._save(record)
        except Exception as exc:
            log.warning("%s: could not save %s: %s", self.name, record.batch_id, exc)

    def run(self, record: BatchRecord) -> BatchRecord:
        """Screen one claimed batch to done or failed; never raises for the batch's own errors."""
        stop = threading.Event()
        beat = threading.Thread(target=self._beat, args=(record, stop), daemon=True)
        beat.start()
        try:
            ref = load_batch(self.store, record.center, record.batch)
            record.slides = [SlideProgress(slide_id=s.slide_id) for s in ref.manifest.slides]
            self._save(record)
            screening = self._pinned(record)
            classifier = ModelRef(
                name=screening.classifier_model, version=screening.classifier_version
            )
            adapters = None
            if self.adapters_for and record.adapt != "none":
                adapters = self.adapters_for(classifier, record.adapt)
            by_id = {s.slide_id: s for s in record.slides}

            def on_slide(bag: SlideBag) -> None:
                entry = by_id[bag.slide_id]
                entry.status = slide_status(bag, screening.adequacy)
                entry.error = bag.error or None
                self._try_save(record)

            [outcome] = screen_batches(
                self.store,
                [ref],
                screening,
                run_id=f"svc-{record.batch_id}-a{record.attempts}",
                on_slide=on_slide,
                adapters=adapters,
            )
            self._published_statuses(record, by_id, outcome.run_id)
            record.state, record.run_id = "done", outcome.run_id
            record.adaptation = outcome.adaptation
            keys = ("slides", "screened", "inadequate", "failed", "rejected", "positive", "cells")
            record.summary = {k: getattr(outcome, k) for k in keys}
        except Exception as exc:
            log.exception("%s: batch %s/%s failed", self.name, record.center, record.batch)
            record.state, record.error = "failed", f"{type(exc).__name__}: {exc}".splitlines()[0]
        finally:
            stop.set()
            record.finished_at = time.time()
            self._save(record)
        log.info("%s: %s/%s %s", self.name, record.center, record.batch, record.state)
        return record

    def _published_statuses(
        self, record: BatchRecord, by_id: dict[str, SlideProgress], run_id: str
    ) -> None:
        """Each slide's status and error as the run's committed rows say, so the record and
        the table never disagree; kept as they are (and logged) if the rows cannot be read."""
        try:
            rows = read_table(self.store, "slides", [record.center], [record.batch]).to_pylist()
        except Exception as exc:
            log.warning("%s: %s's rows not read back: %s", self.name, record.batch_id, exc)
            return
        for row in rows:
            entry = by_id.get(row["slide_id"])
            if entry is not None and row["run_id"] == run_id:
                entry.status, entry.error = row["status"], row["error"]

    def _pinned(self, record: BatchRecord) -> ScreeningConfig:
        """The screening config with the record's adaptation and the classifier pinned, so the
        bags and the adapter agree on one classifier version even if LATEST moves meanwhile."""
        s = self.cfg.screening
        ref = pin(self.store, ModelRef(name=s.classifier_model, version=s.classifier_version))
        version = ref.version
        adapt = s.adapt.model_copy(update={"method": record.adapt})
        return s.model_copy(update={"classifier_version": version, "adapt": adapt})

    def _beat(self, record: BatchRecord, stop: threading.Event) -> None:
        while not stop.wait(self.cfg.lease_s / 4):
            self._try_save(record)
