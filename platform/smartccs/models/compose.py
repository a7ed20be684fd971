"""A slide classifier composed of models already in the store: ``ccs models compose``.

The Smart-CCS release is a pipeline of separate files (detector, encoder, MeanMIL head,
prototype bank); the screening engine runs one classifier version, which names its detector and
encoder and holds its slide head. Composing writes that version: the MeanMIL head (and the
bank, for smartccs adaptation) as its weights, the detector and encoder pinned by version, and
cells cut the reference's way (smartccs.models.cells.CropGeometry) on the detector's tiles.
Every part is checked against the others before anything is written. torch is imported only
when a classifier is composed, so the ``ccs`` parser that names the default threshold stays
light.
"""

from __future__ import annotations

from typing import Any

from smartccs.errors import CCSError
from smartccs.models.artifacts import (
    ModelCard,
    Task,
    load_card,
    load_model,
    require_model,
    save_model,
)
from smartccs.models.cells import CellConfig, CropGeometry
from smartccs.models.refs import ModelRef
from smartccs.store import Store
from smartccs.taxonomy import GRADES

DETECTOR_TASKS = ("detector", "cell_detector")
DEFAULT_THRESHOLD = 0.5
"""Score (1 - P(NILM)) from which a composed classifier calls a slide positive. The reference
releases no operating point (it calls a slide abnormal when its likeliest grade is not NILM);
a center should choose its own on labelled slides of its population."""


def check_threshold(threshold: float) -> None:
    """A slide score threshold is a probability strictly between 0 and 1."""
    if not 0 < threshold < 1:
        raise CCSError(f"threshold must lie strictly between 0 and 1, got {threshold}")


def _card(store: Store, label: str, task: Task) -> tuple[ModelRef, ModelCard]:
    """Model ``label`` of ``task``, pinned, or the error naming what the store holds."""
    ref = ModelRef.parse(label)
    card = require_model(store, ref.name, ref.version or "latest", task)
    return ModelRef(name=card.name, version=str(card.version)), card


def _detector(store: Store, label: str) -> tuple[ModelRef, ModelCard]:
    """A detector of the platform's or the imported Deformable DETR."""
    ref = ModelRef.parse(label)
    try:
        card = load_card(store, ref.name, ref.version or "latest")
    except (CCSError, ValueError):
        return _card(store, label, "detector")  # raises, naming the detectors there
    if card.task not in DETECTOR_TASKS:
        raise CCSError(f"{label} is a {card.task}, not a cell detector")
    return ModelRef(name=card.name, version=str(card.version)), card


def _check(enc: ModelCard, head: ModelCard, bank: ModelCard | None) -> tuple[int, Any]:
    """The embedding width every part agrees on and the head's MeanMIL shape, or the error
    naming the two that differ."""
    from smartccs.models.slide_head import MeanMILShape

    kind, dim = enc.head.get("kind"), enc.head.get("embed_dim")
    if dim is None:
        raise CCSError(f"encoder {enc.name}/{enc.version} was not imported (ccs models import)")
    for part in (head, bank):
        if part is None:
            continue
        if part.head.get("encoder_kind") != kind:
            raise CCSError(
                f"{part.task} {part.name}/{part.version} goes with {part.head.get('encoder_kind')}"
                f" embeddings, encoder {enc.name}/{enc.version} is {kind}"
            )
    shape = head.head_fields(MeanMILShape)
    if shape.in_dim != dim:
        raise CCSError(f"{head.name}/{head.version} takes {shape.in_dim}-d cells, not {dim}-d")
    return int(dim), shape


def _bank_tensors(card: ModelCard | None, state: dict, dim: int) -> dict[str, Any]:
    """The bank's prototypes stacked (P, D) and each one's grade index (P,); none without."""
    import torch

    from smartccs.models.slide_head import PrototypeBank, prototype_tensors

    if card is None:
        return {"prototypes": torch.zeros(0, dim), "prototype_grades": torch.zeros(0).long()}
    by_grade = prototype_tensors(state, card.head_fields(PrototypeBank))
    grades = [torch.full((len(t),), c, dtype=torch.long) for c, t in by_grade.items()]
    return {
        "prototypes": torch.cat(list(by_grade.values())).float(),
        "prototype_grades": torch.cat(grades),
    }


def compose_classifier(
    store: Store,
    *,
    name: str,
    encoder: str,
    slide_head: str,
    detector: str,
    prototypes: str | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> ModelRef:
    """Write classifier ``name`` from the store's ``encoder``, MeanMIL ``slide_head``, cell
    ``detector`` (the platform's or the imported Deformable DETR) and optional TTA
    ``prototypes`` (each ``name`` or ``name/version``); returns its pinned ref."""
    check_threshold(threshold)
    enc_ref, enc = _card(store, encoder, "encoder")
    head_ref, _ = _card(store, slide_head, "slide_head")
    det_ref, det = _detector(store, detector)
    head, head_state = load_model(store, head_ref.name, head_ref.version)
    bank, bank_state, bank_ref = None, {}, None
    if prototypes:
        bank_ref, _ = _card(store, prototypes, "prototypes")
        bank, bank_state = load_model(store, bank_ref.name, bank_ref.version)
    dim, shape = _check(enc, head, bank)
    geometry = CropGeometry.model_validate(enc.head.get("crop") or {})
    weights = {f"mil.{k}": v for k, v in head_state.items()}
    weights |= _bank_tensors(bank, bank_state, dim)
    parts = [enc, head, det, *([bank] if bank else [])]
    card = ModelCard(
        name=name,
        architecture=enc.architecture,
        task="classifier",
        classes=list(GRADES),
        head={
            "kind": "meanmil",
            "meanmil": shape.model_dump(),
            "dim": dim,
            "top_k": geometry.top_k,
            "detector": det_ref.model_dump(),
            "encoder": enc_ref.model_dump(),
            "cells": CellConfig(crop=geometry, cells_per_tile=geometry.max_cells).model_dump(
                mode="json"
            ),
            "threshold": threshold,
            "operating_point": None,
            "composed_of": {
                "slide_head": head_ref.label,
                "prototypes": bank_ref.label if bank_ref else None,
            },
        },
        tiling=det.tiling,
        normalization=enc.normalization,
        synthetic=any(p.synthetic for p in parts),
    )
    return ModelRef(name=name, version=save_model(store, card, weights))
