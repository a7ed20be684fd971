"""The cells stage over Ray Data: the scorer actors and the stream of each slide's bag.

Shared by screening runs and by classifier training, which screens its training slides the
same way. Tiles are cut on the detector's own grid (``screening.cells.on_detector_grid``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from smartccs.data.tiles import StreamConfig, plan_stream, tile_stream
from smartccs.engine.config import ScorerPool
from smartccs.ids import SlideKey
from smartccs.models.artifacts import load_card
from smartccs.models.refs import ModelRef, encoder_ref
from smartccs.raycluster import MIN_LOCAL_CPUS, Demand, check_placement
from smartccs.screening.bags import SlideBag, iter_bags
from smartccs.screening.cells import CellConfig, CellScorer, on_detector_grid
from smartccs.stain import StainCalibration
from smartccs.store import Store

log = logging.getLogger(__name__)


def embedding_dim(store: Store, detector: ModelRef, encoder: ModelRef | None = None) -> int:
    """Width of the cell embeddings of ``encoder`` (default: the detector's): an imported
    encoder's card says it; otherwise it is read off the network built on the meta device, so
    no weights are allocated and asking costs nothing even for ViT-L."""
    import torch

    from smartccs.models.encoder import build_from

    enc = encoder or encoder_ref(load_card(store, detector.name, detector.version))
    card = load_card(store, enc.name, enc.version)
    if "embed_dim" in card.head:
        return int(card.head["embed_dim"])
    with torch.device("meta"):
        return int(build_from(card.architecture).num_features)


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
    encoder: ModelRef | None = None,
):
    """A Ray Dataset of cell rows and tile summary rows (see ``screening.cells``) for ``rows``.

    Tiles are cut on the grid the detector was trained on (its card's tiling), whatever
    ``stream.tiling`` says: a detector sees cells at the scale it learned them or not at all.
    """
    import ray

    check_resources(stream, pool)
    stream = on_detector_grid(stream, load_card(store, detector.name, detector.version))

    kwargs: dict[str, Any] = {
        "store_config": store.config,
        "detector": detector,
        "cells": cells,
        "threads": max(1, int(pool.cpus)),
        "views": views,
        "norms": {k: np.asarray(v) for k, v in (norms or {}).items()} or None,
        "stain": stain,
        "encoder": encoder,
    }
    if pool.fused:
        source = plan_stream(rows, store.config, stream, block_rows=pool.batch_size)
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
    encoder: ModelRef | None = None,
) -> Iterator[SlideBag]:
    """Each slide's bag as soon as its last tile is scored, then any incomplete ones.
    ``encoder``: the one the classifier names (default: the detector's own)."""
    ds = cell_stream(
        store, rows, detector, cells, stream, pool, views=views, norms=norms, stain=stain,
        encoder=encoder,
    )  # fmt: skip
    yield from iter_bags(
        ds.iter_batches(batch_size=256, batch_format="numpy"),
        top_k=top_k,
        dim=embedding_dim(store, detector, encoder),
        expected=_keys(rows),
        views=views,
    )
