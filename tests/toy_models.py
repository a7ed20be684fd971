"""Tiny real model artifacts (random weights, saved through the normal artifact path) so the
screening engine can be tested end to end without spending minutes on training. What the
models predict is meaningless; everything around them (tiling, detection, crops, bags, MIL,
tables) is the production code. Training itself is covered by test_finetune_jobs.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from smartccs.adaptation.stain import REFERENCE_KEY
from smartccs.data.tiles import StreamConfig
from smartccs.engine.config import ScorerPool, ScreeningConfig
from smartccs.metrics.operating_point import OperatingPoint
from smartccs.models.artifacts import Architecture, ModelCard, save_model
from smartccs.models.detector import DETECTION_CLASSES, HeadConfig, build_detector
from smartccs.models.encoder import build_from
from smartccs.models.mil import MILConfig, MILHead
from smartccs.models.refs import ModelRef
from smartccs.screening.cells import CellConfig
from smartccs.screening.slides import AdequacyConfig
from smartccs.slide.tiling import TilingConfig
from smartccs.stain import StainReference
from smartccs.store import Store
from smartccs.taxonomy import GRADES

TOY_TILING = TilingConfig(target_mpp=1.0, tile_px=128)
TOY_ENCODER = Architecture(
    timm_name="vit_tiny_patch16_224",
    kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
            "dynamic_img_size": True},
)  # fmt: skip


def save_toy_models(
    store: Store,
    *,
    seed: int = 0,
    threshold: float = 0.5,
    names: tuple[str, str, str] = ("encoder", "detector", "classifier"),
    stain_reference: StainReference | None = None,
    operating_point: OperatingPoint | None = None,
    tiling: TilingConfig = TOY_TILING,
) -> ModelRef:
    """Encoder, detector and classifier versions in ``store`` (under ``names``); returns the
    classifier's ref.

    The detector's score floor is tiny so that its untrained head still reports cells.
    """
    enc_name, det_name, cls_name = names
    torch.manual_seed(seed)
    enc_card = ModelCard(
        name=enc_name, architecture=TOY_ENCODER, task="encoder", tiling=tiling,
        synthetic=True,
    )  # fmt: skip
    enc_version = save_model(store, enc_card, build_from(TOY_ENCODER).state_dict())
    det_card = ModelCard(
        name=det_name,
        architecture=TOY_ENCODER,
        task="detector",
        classes=list(DETECTION_CLASSES),
        head={
            "config": HeadConfig(width=16, score_floor=0.001, max_per_tile=20).model_dump(),
            "input_px": 64,
        }
        | ({REFERENCE_KEY: stain_reference.model_dump()} if stain_reference else {}),
        tiling=tiling,
        training_config={"encoder_model": enc_name, "encoder_version": enc_version},
        synthetic=True,
    )
    det_version = save_model(store, det_card, build_detector(det_card).state_dict())
    mil = MILConfig(hidden=16, top_k=5, dropout=0.0)
    dim = 32
    cls_card = ModelCard(
        name=cls_name,
        architecture=TOY_ENCODER,
        task="classifier",
        classes=list(GRADES),
        head={
            "mil": mil.model_dump(mode="json"),
            "cells": CellConfig(cells_per_tile=4, squamous_score=0.001).model_dump(mode="json"),
            "detector": {"name": det_name, "version": det_version},
            "encoder": {"name": enc_name, "version": enc_version},
            "dim": dim,
            "threshold": threshold,
        }
        | ({"operating_point": operating_point.model_dump(mode="json")} if operating_point else {}),
        tiling=tiling,
        synthetic=True,
    )
    version = save_model(store, cls_card, MILHead(dim, mil).state_dict())
    return ModelRef(name=cls_name, version=version)


def stand_in_classifier(threshold: float = 0.5) -> SimpleNamespace:
    """What ``slides_table`` reads of a ``SlideClassifier``, for row tests without a model."""
    return SimpleNamespace(
        threshold=threshold,
        detector=ModelRef(name="detector", version="1"),
        encoder=ModelRef(name="encoder", version="1"),
        ref=ModelRef(name="classifier", version="1"),
        label="classifier/1",
    )


def toy_screening(tmp: Path, tiles_per_call: int = 8, min_squamous: int = 1) -> ScreeningConfig:
    """A screening config sized for the tiny cohort on the shared 4-CPU test Ray."""
    stream = StreamConfig(
        readers=1, reader_cpus=0.5, planner_cpus=0.25, batch_size=8, cache_dir=str(tmp / "cache")
    )
    return ScreeningConfig(
        stream=stream,
        scorers=ScorerPool(batch_size=tiles_per_call),
        adequacy=AdequacyConfig(min_squamous=min_squamous),
    )
