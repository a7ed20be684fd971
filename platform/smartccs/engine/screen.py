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
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from smartccs.adaptation.config import AdaptConfig
from smartccs.adaptation.stain import center_calibration, detector_reference, measure_stain
from smartccs.adaptation.state import DetectorAdaptation
from smartccs.batches import BatchRef
from smartccs.data.tiles import StreamConfig, plan_stream, slide_rows, tile_stream
from smartccs.ids import Id
from smartccs.logs import Progress
from smartccs.models.artifacts import load_card
from smartccs.raycluster import MIN_LOCAL_CPUS, Demand, check_placement
from smartccs.results.schema import STATUS_REJECTED
from smartccs.results.tables import ResultCommit, write_batch_results
from smartccs.screening.bags import SlideBag, SlideKey, iter_bags
from smartccs.screening.cells import CellConfig, CellScorer, ModelRef, encoder_ref
from smartccs.screening.slides import AdequacyConfig, SlideClassifier, cells_table, slides_table
from smartccs.screening.threshold import (
    AppliedThreshold,
    ThresholdConfig,
    carried_threshold,
    center_history,
)
from smartccs.stain import StainCalibration, merge_stats
from smartccs.store import Store

log = logging.getLogger(__name__)


class ScorerPool(BaseModel):
    """The detector/embedder actors: on a GPU cluster one per GPU, here a CPU or two."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    actors: int = Field(default=1, ge=1)
    cpus: float = Field(default=1.0, gt=0)
    gpus: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=16, ge=1, description="tiles per detector call")
    fused: bool = Field(
        default=True,
        description="read tiles inside the scorer actors (no pixels in the object store); "
        "false: separate reader actors (stream.readers) feed the scorers",
    )


def embedding_dim(store: Store, detector: ModelRef) -> int:
    """Width of the cell embeddings, read off the encoder built on the meta device: no weights
    are allocated, so asking costs nothing even for ViT-L."""
    import torch

    from smartccs.models.encoder import build_from

    enc = encoder_ref(load_card(store, detector.name, detector.version))
    with torch.device("meta"):
        return int(build_from(load_card(store, enc.name, enc.version).architecture).num_features)


def check_resources(stream: StreamConfig, pool: ScorerPool) -> None:
    """Fail at once, naming the settings, when the cluster cannot hold the scorer pool (and in
    split mode one reader) and still run a planning task beside them.

    Ray Data starts every actor of a pool first: were they to take every CPU, planning would
    wait for ever, with no error and no progress. An autoscaled cluster is judged on what its
    config lets it grow to (``raycluster.cluster_nodes``), a fixed or local one on its nodes.
    """
    one = f"scorers.cpus={pool.cpus:g}"
    one = f"({one}, scorers.gpus={pool.gpus:g})" if pool.gpus else one
    label = f"scorers.actors={pool.actors} x {one}"
    demands = [Demand(label, {"CPU": pool.cpus, "GPU": pool.gpus}, pool.actors)]
    lower = "scorers.actors or scorers.cpus" + ("/gpus" if pool.gpus else "")
    if not pool.fused:  # Ray Data starts one reader at least
        reader = f"a reader of stream.reader_cpus={stream.reader_cpus:g}"
        demands.append(Demand(reader, {"CPU": stream.reader_cpus}))
        lower += " or stream.reader_cpus"
    planner = f"stream.planner_cpus={stream.planner_cpus:g} for planning"
    demands.append(Demand(planner, {"CPU": stream.planner_cpus}))
    more = "CPUs or GPUs" if pool.gpus else "logical CPUs"
    check_placement(
        "screening",
        demands,
        f"lower {lower}, or give Ray more {more} (the CLI doors start a local Ray with at "
        f"least {MIN_LOCAL_CPUS} CPUs)",
    )


def cell_stream(
    store: Store,
    rows: list[dict[str, Any]],
    detector: ModelRef,
    cells: CellConfig,
    stream: StreamConfig,
    pool: ScorerPool,
    views: int = 1,
    norms: dict[str, Any] | None = None,
    stain: StainCalibration | None = None,
):
    """A Ray Dataset of cell rows and tile summary rows (see ``screening.cells``) for ``rows``.

    Tiles are cut on the grid the detector was trained on (its card's tiling), whatever
    ``stream.tiling`` says: a detector sees cells at the scale it learned them or not at all.
    """
    import ray

    check_resources(stream, pool)
    tiling = load_card(store, detector.name, detector.version).tiling
    if tiling != stream.tiling:
        log.info("tiling from detector %s/%s: %s", detector.name, detector.version, tiling)
        stream = stream.model_copy(update={"tiling": tiling})

    kwargs: dict[str, Any] = {
        "store_config": store.config,
        "detector": detector,
        "cells": cells,
        "threads": max(1, int(pool.cpus)),
        "views": views,
        "norms": {k: np.asarray(v) for k, v in (norms or {}).items()} or None,
        "stain": stain,
    }
    if pool.fused:
        source = plan_stream(rows, store.config, stream)
        kwargs["stream"] = stream
    else:
        source = tile_stream(rows, store.config, stream)
    return source.map_batches(
        CellScorer,
        fn_constructor_kwargs=kwargs,
        compute=ray.data.ActorPoolStrategy(size=pool.actors),  # all up at once: no ramp-up
        batch_size=pool.batch_size,
        batch_format="numpy",
        num_cpus=pool.cpus,
        num_gpus=pool.gpus or None,
    )


def _keys(rows: list[dict[str, Any]]) -> list[SlideKey]:
    return [(r["center"], r["batch"], r["slide_id"]) for r in rows]


def screen_bags(
    store: Store,
    rows: list[dict[str, Any]],
    detector: ModelRef,
    cells: CellConfig,
    stream: StreamConfig,
    pool: ScorerPool,
    top_k: int,
    views: int = 1,
    norms: dict[str, Any] | None = None,
    stain: StainCalibration | None = None,
) -> Iterator[SlideBag]:
    """Each slide's bag as soon as its last tile is scored, then any incomplete ones."""
    ds = cell_stream(
        store, rows, detector, cells, stream, pool, views=views, norms=norms, stain=stain
    )
    yield from iter_bags(
        ds.iter_batches(batch_size=256, batch_format="numpy"),
        top_k=top_k,
        dim=embedding_dim(store, detector),
        expected=_keys(rows),
        views=views,
    )


class ScreeningConfig(BaseModel):
    """What a screening run uses besides its batches; shared by the job and the service."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    classifier_model: Id = "classifier"
    classifier_version: str = Field(default="latest", description="resolved once, at start")
    stream: StreamConfig = StreamConfig(readers=1, reader_cpus=0.5, planner_cpus=0.25)
    scorers: ScorerPool = ScorerPool()
    adequacy: AdequacyConfig = AdequacyConfig()
    adapt: AdaptConfig = AdaptConfig()
    threshold: ThresholdConfig = ThresholdConfig()


class BatchOutcome(BaseModel):
    """One published batch."""

    model_config = ConfigDict(frozen=True)

    center: str
    batch: str
    run_id: str
    slides: int
    screened: int
    inadequate: int
    failed: int
    positive: int
    cells: int
    commit: ResultCommit
    adaptation: str | None = None
    rejected: int = 0  # not cytology (slide.specimen): neither scored nor negative


def new_run_id() -> str:
    return datetime.now(UTC).strftime("screen-%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]


def _manifest_order(ref: BatchRef, bags: Iterable[SlideBag]) -> list[SlideBag]:
    order = {s.slide_id: i for i, s in enumerate(ref.manifest.slides)}
    return sorted(bags, key=lambda b: order.get(b.slide_id, len(order)))


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


def _publish(
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


class Adapters(Protocol):
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
    adapters: Adapters | None = None,
) -> list[BatchOutcome]:
    """Screen committed batches and publish each one's tables as soon as it is complete.

    With adaptation, batches run one after another in the order given, so each center's
    batches adapt in order, each starting from the state the one before it left.
    """
    refs = list(refs)
    check_resources(cfg.stream, cfg.scorers)  # before adaptation's tasks, which wait the same
    run_id = run_id or new_run_id()
    # resolves 'latest' once; classifier.ref is the pinned version
    ref = ModelRef(name=cfg.classifier_model, version=cfg.classifier_version)
    classifier = SlideClassifier(store, ref)
    log.info(
        "run %s: screening %d slides in %d batches with %s/%s (detector %s/%s), adaptation %s",
        run_id,
        sum(len(r.manifest.slides) for r in refs),
        len(refs),
        classifier.ref.name,
        classifier.ref.version,
        classifier.detector.name,
        classifier.detector.version,
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
        outcome = _publish(store, ref, bags, probs, label, classifier, cfg, run_id)
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
    adapters: Adapters,
    on_slide: Callable[[SlideBag], None] | None,
) -> tuple[list[SlideBag], DetectorAdaptation]:
    """One batch's bags under its center's adaptation. First the batch's stain is measured on
    a sample of its tiles and folded into the center's; then tent adapts the detector's norms
    on a sample (in the calibrated stain); both in tasks with a scorer's resources."""
    import ray

    prepared, seen = adapters.prepare(ref.center, ref.batch)
    norms, stain = prepared.norms or None, prepared.stain
    card = load_card(store, classifier.detector.name, classifier.detector.version)
    stream = cfg.stream.model_copy(update={"tiling": card.tiling})
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
