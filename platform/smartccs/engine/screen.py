"""The screening engine: committed batches in, one row per slide in the result tables out.

One code path for the batch job, the service and classifier training::

    slide rows -> plan tiles (tasks) -> read + detect + crop + embed (CellScorer actors)
               -> top-K cells per class per slide (driver, streaming) -> MIL head -> tables

Tiles are read inside the scorer actors by default (``fused``), so pixels never enter the
object store and only detections and embeddings travel: memory stays bounded by Ray Data's
backpressure whatever the slide size. Split mode (reader actors feeding scorer actors through
the object store) is there for GPU nodes where one process cannot read fast enough to keep
its GPU busy. Each batch is published the moment its last slide is scored, atomically and
replacing any earlier run of the same batch, so a cohort run is never all-or-nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import numpy as np

from smartccs.adaptation.stain import center_calibration, detector_reference, measure_stain
from smartccs.adaptation.state import DetectorAdaptation
from smartccs.batches import BatchRef
from smartccs.data.tiles import slide_rows
from smartccs.engine.config import BatchOutcome, ScreeningConfig, new_run_id
from smartccs.engine.stream import check_resources, screen_bags
from smartccs.logs import Progress
from smartccs.models.artifacts import load_card
from smartccs.models.refs import ModelRef, pin
from smartccs.results.schema import STATUS_REJECTED
from smartccs.results.tables import write_batch_results
from smartccs.screening.bags import SlideBag
from smartccs.screening.cells import on_detector_grid
from smartccs.screening.slides import (
    SlideClassifier,
    cells_table,
    check_adaptation,
    slides_table,
)
from smartccs.screening.threshold import (
    AppliedThreshold,
    ThresholdConfig,
    carried_threshold,
    center_history,
)
from smartccs.stain import merge_stats
from smartccs.store import Store

log = logging.getLogger(__name__)


def batch_threshold(
    store: Store,
    ref: BatchRef,
    bags: list[SlideBag],
    probs: np.ndarray,
    adaptation: str | None,
    classifier: SlideClassifier,
    cfg: ThresholdConfig,
) -> AppliedThreshold:
    """The threshold this batch is called at: the classifier's operating point carried to the
    center with every slide scored there so far, this batch's included (``screening.threshold``)."""
    scores = [float(1 - p[0]) for bag, p in zip(bags, probs, strict=True) if bag.ok]
    if cfg.carry == "center":
        seen = center_history(store, ref.center, ref.batch, classifier.label, adaptation)
        scores = [*seen.tolist(), *scores]
    applied = carried_threshold(classifier.operating_point, classifier.threshold, scores, cfg)
    log.info("%s/%s: %s", ref.center, ref.batch, applied.describe())
    return applied


def publish_batch(
    store: Store,
    ref: BatchRef,
    bags: list[SlideBag],
    probs: np.ndarray,
    adaptation: str | None,
    classifier: SlideClassifier,
    cfg: ScreeningConfig,
    run_id: str,
) -> BatchOutcome:
    applied = batch_threshold(store, ref, bags, probs, adaptation, classifier, cfg.threshold)
    slides = slides_table(
        bags,
        probs,
        run_id=run_id,
        classifier=classifier,
        adequacy=cfg.adequacy,
        adaptation=adaptation,
        threshold=applied,
    )
    cells = cells_table(bags, run_id=run_id)
    commit = write_batch_results(store, ref.center, ref.batch, run_id, slides, cells)
    status = slides.column("status").to_pylist()
    outcome = BatchOutcome(
        center=ref.center,
        batch=ref.batch,
        run_id=run_id,
        slides=len(bags),
        screened=status.count("screened"),
        inadequate=status.count("inadequate"),
        failed=status.count("failed"),
        rejected=status.count(STATUS_REJECTED),
        positive=sum(bool(v) for v in slides.column("positive").to_pylist()),
        cells=cells.num_rows,
        commit=commit,
        adaptation=adaptation,
    )
    log.info(
        "published %s/%s: %d slides (%d screened, %d inadequate, %d failed, %d rejected), "
        "%d positive, %d cells, run %s",
        ref.center,
        ref.batch,
        outcome.slides,
        outcome.screened,
        outcome.inadequate,
        outcome.failed,
        outcome.rejected,
        outcome.positive,
        outcome.cells,
        run_id,
    )
    return outcome


class CenterAdapters(Protocol):
    """Where centers' adapted states live: in this process for the batch job
    (``smartccs.adaptation.adapter.LocalAdapters``), a multiplexed deployment for the service."""

    def prepare(self, center: str, batch: str) -> tuple[DetectorAdaptation, bool]:
        """The center's detector norms and stain, and whether ``batch`` was adapted on already."""
        ...

    def adapt(
        self, center: str, batch: str, bags: list[SlideBag], detector: DetectorAdaptation | None
    ) -> tuple[np.ndarray, str, dict[str, float]]: ...


def screen_batches(
    store: Store,
    refs: Iterable[BatchRef],
    cfg: ScreeningConfig,
    run_id: str | None = None,
    on_batch: Callable[[BatchOutcome], None] | None = None,
    on_slide: Callable[[SlideBag], None] | None = None,
    adapters: CenterAdapters | None = None,
) -> list[BatchOutcome]:
    """Screen committed batches and publish each one's tables as soon as it is complete.

    With adaptation, batches run one after another in the order given, so each center's
    batches adapt in order, each starting from the state the one before it left.
    """
    refs = list(refs)
    check_resources(cfg.stream, cfg.scorers)  # before adaptation's tasks, which wait the same
    run_id = run_id or new_run_id()
    # 'latest' resolved once, as the service does (models.refs.pin)
    ref = pin(store, ModelRef(name=cfg.classifier_model, version=cfg.classifier_version))
    classifier = SlideClassifier(store, ref)
    check_adaptation(store, classifier.card, cfg.adapt.method)
    log.info(
        "run %s: screening %d slides in %d batches with %s (detector %s), adaptation %s",
        run_id,
        sum(len(r.manifest.slides) for r in refs),
        len(refs),
        classifier.ref.label,
        classifier.detector.label,
        cfg.adapt.method,
    )
    t0 = time.perf_counter()
    outcomes: list[BatchOutcome] = []
    total = sum(len(r.manifest.slides) for r in refs)
    progress, done = Progress(total, seconds=30), 0

    def slide_done(bag: SlideBag) -> None:
        nonlocal done
        done += 1
        if progress.due(done):
            log.info("run %s: %d/%d slides screened, %s", run_id, done, total, progress.eta(done))
        if on_slide:
            on_slide(bag)

    def publish(ref: BatchRef, bags: list[SlideBag], probs: np.ndarray, label: str | None):
        outcome = publish_batch(store, ref, bags, probs, label, classifier, cfg, run_id)
        outcomes.append(outcome)
        if on_batch:
            on_batch(outcome)

    if cfg.adapt.method == "none":
        for ref, bags in _stream_batches(store, refs, classifier, cfg, slide_done):
            publish(ref, bags, classifier.predict(bags), None)
    else:
        if adapters is None:
            from smartccs.adaptation.adapter import LocalAdapters

            adapters = LocalAdapters(store, classifier, cfg.adapt)
        for ref in refs:
            bags, detector = _adapted_stream(store, ref, classifier, cfg, adapters, slide_done)
            probs, label, _ = adapters.adapt(ref.center, ref.batch, bags, detector)
            publish(ref, bags, probs, label)
    log.info("run %s: %d batches in %.1f s", run_id, len(outcomes), time.perf_counter() - t0)
    return outcomes


def _manifest_order(ref: BatchRef, bags: Iterable[SlideBag]) -> list[SlideBag]:
    order = {s.slide_id: i for i, s in enumerate(ref.manifest.slides)}
    return sorted(bags, key=lambda b: order.get(b.slide_id, len(order)))


def _stream_batches(
    store: Store,
    refs: list[BatchRef],
    classifier: SlideClassifier,
    cfg: ScreeningConfig,
    on_slide: Callable[[SlideBag], None] | None,
    **stream_options: Any,
) -> Iterator[tuple[BatchRef, list[SlideBag]]]:
    """One stream over every batch; each batch's bags, in manifest order, once complete."""
    by_batch = {(r.center, r.batch): r for r in refs}
    waiting: dict[tuple[str, str], set[str]] = {
        (r.center, r.batch): {s.slide_id for s in r.manifest.slides} for r in refs
    }
    done: dict[tuple[str, str], list[SlideBag]] = {k: [] for k in waiting}
    bags = screen_bags(
        store,
        slide_rows(refs),
        classifier.detector,
        classifier.cells,
        cfg.stream,
        cfg.scorers,
        classifier.top_k,
        encoder=classifier.encoder,
        **stream_options,
    )
    for bag in bags:
        key = (bag.center, bag.batch)
        if bag.slide_id not in waiting[key]:
            continue
        waiting[key].discard(bag.slide_id)
        done[key].append(bag)
        if on_slide:
            on_slide(bag)
        if not waiting[key]:
            yield by_batch[key], _manifest_order(by_batch[key], done.pop(key))


def _adapted_stream(
    store: Store,
    ref: BatchRef,
    classifier: SlideClassifier,
    cfg: ScreeningConfig,
    adapters: CenterAdapters,
    on_slide: Callable[[SlideBag], None] | None,
) -> tuple[list[SlideBag], DetectorAdaptation]:
    """One batch's bags under its center's adaptation. First the batch's stain is measured on
    a sample of its tiles and folded into the center's; then tent adapts the detector's norms
    on a sample (in the calibrated stain); both in tasks with a scorer's resources."""
    import ray

    prepared, seen = adapters.prepare(ref.center, ref.batch)
    norms, stain = prepared.norms or None, prepared.stain
    card = load_card(store, classifier.detector.name, classifier.detector.version)
    stream = on_detector_grid(cfg.stream, card)
    resources = {"num_cpus": cfg.scorers.cpus, "num_gpus": cfg.scorers.gpus or None}
    calibration = None
    if cfg.adapt.stain.enabled and detector_reference(card) is None:
        log.warning(
            "detector %s/%s has no stain reference (trained before it was recorded): "
            "no stain calibration for %s/%s",
            card.name,
            card.version,
            ref.center,
            ref.batch,
        )
    elif cfg.adapt.stain.enabled:
        if not seen:  # a batch is measured once; a re-run uses what the state holds
            measured = ray.get(
                ray.remote(measure_stain)
                .options(**resources)
                .remote(store.config, slide_rows([ref]), stream, cfg.adapt.stain.tiles)
            )
            stain = merge_stats(stain, measured) if measured is not None else stain
        calibration = center_calibration(card, stain)
        log.info(
            "stain %s/%s: %s",
            ref.center,
            ref.batch,
            "inside the detector's training range, as it is"
            if calibration is None
            else calibration.model_dump(exclude={"glass_in", "glass_out"}),
        )
    if cfg.adapt.method == "tent" and not seen:  # a batch is adapted on once
        from smartccs.adaptation.tent import tent_batch

        norms, stats = ray.get(
            ray.remote(tent_batch)
            .options(**resources)
            .remote(
                store.config, classifier.detector, slide_rows([ref]), cfg.stream, norms,
                cfg.adapt, calibration,
            )
        )  # fmt: skip
        log.info(
            "tent %s/%s: %s", ref.center, ref.batch, {k: round(v, 4) for k, v in stats.items()}
        )
    views = 2 if cfg.adapt.method == "smartccs" else 1
    streamed = _stream_batches(
        store, [ref], classifier, cfg, on_slide, views=views, norms=norms, stain=calibration
    )
    bags = next((bags for _, bags in streamed), [])
    return bags, DetectorAdaptation(norms=norms or {}, stain=stain)
