"""The screening engine's stages on Ray Data, shared by classifier training, the batch job and
the service: slide rows -> tile stream -> CellScorer pool -> one bag per slide."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from smartccs.data.tiles import StreamConfig, tile_stream
from smartccs.models.artifacts import load_card
from smartccs.screening.bags import SlideBag, collect_bags
from smartccs.screening.cells import CellConfig, CellScorer, ModelRef, encoder_ref
from smartccs.store import Store


class ScorerPool(BaseModel):
    """The detector/embedder actors: on a GPU cluster one per GPU, here a CPU or two."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    actors: int = Field(default=1, ge=1)
    cpus: float = Field(default=1.0, gt=0)
    gpus: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=16, ge=1, description="tiles per detector call")


def embedding_dim(store: Store, detector: ModelRef) -> int:
    """Width of the cell embeddings, read off the encoder built on the meta device: no weights
    are allocated, so asking costs nothing even for ViT-L."""
    import torch

    from smartccs.models.encoder import build_from

    enc = encoder_ref(load_card(store, detector.name, detector.version))
    with torch.device("meta"):
        return int(build_from(load_card(store, enc.name, enc.version).architecture).num_features)


def screen_cells(
    store: Store,
    rows: list[dict[str, Any]],
    detector: ModelRef,
    cells: CellConfig,
    stream: StreamConfig,
    pool: ScorerPool,
    top_k: int,
) -> dict[tuple[str, str, str], SlideBag]:
    """Detect, embed and keep the top-K cells per class of every slide in ``rows``."""
    import ray

    ds = tile_stream(rows, store.config, stream).map_batches(
        CellScorer,
        fn_constructor_kwargs={
            "store_config": store.config,
            "detector": detector,
            "cells": cells,
            "threads": max(1, int(pool.cpus)),
        },
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool.actors),
        batch_size=pool.batch_size,
        batch_format="numpy",
        num_cpus=pool.cpus,
        num_gpus=pool.gpus or None,
    )
    keys = [(r["center"], r["batch"], r["slide_id"]) for r in rows]
    return collect_bags(
        ds.iter_batches(batch_size=256, batch_format="numpy"),
        top_k=top_k,
        dim=embedding_dim(store, detector),
        expected=keys,
    )
