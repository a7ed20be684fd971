"""A center's adapted state, versioned in the store like any model.

Each adapted batch saves a new version of ``models/adapt-<center>/``: the student and teacher
MIL heads, the detector's normalisation parameters (tent), the center's measured stain and a
card naming the source classifier, the parent version, the batches seen and the resets.
Versions are never rewritten, so any earlier state can be inspected or restored, and
``LATEST`` says which one the center's next batch starts from. A rollback is itself a new
version (a copy of the old one), so the history stays linear and auditable. State adapted
from another classifier is ignored: a new classifier starts every center afresh.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from smartccs.errors import CCSError, StoreError
from smartccs.ids import validate_id
from smartccs.models.artifacts import (
    ModelCard,
    latest_version,
    list_versions,
    load_card,
    load_model,
    save_model,
)
from smartccs.models.refs import ModelRef
from smartccs.stain import StainStats
from smartccs.store import Store

log = logging.getLogger(__name__)

PREFIX = "adapt-"
_PARTS = ("student", "teacher", "norm")


def state_name(center: str) -> str:
    """The model name a center's adapted state is kept under."""
    name = PREFIX + validate_id(center, "center")
    if len(name) > 64:
        raise CCSError(f"center {center!r}: ids over {64 - len(PREFIX)} characters cannot adapt")
    return name


@dataclass
class DetectorAdaptation:
    """What a center's batch is screened with before the MIL head: tent's normalisation
    parameters for the detector (empty: its own) and the center's measured stain."""

    norms: dict[str, torch.Tensor] = field(default_factory=dict)
    stain: StainStats | None = None


@dataclass
class CenterState:
    """What a center's next batch starts from."""

    center: str
    source: ModelRef
    student: dict[str, torch.Tensor]
    teacher: dict[str, torch.Tensor]
    norms: dict[str, torch.Tensor] = field(default_factory=dict)
    version: str | None = None  # None: the source model, never adapted
    method: str = "none"
    batches: list[str] = field(default_factory=list)
    resets: int = 0
    drift: float = 0.0
    stain: StainStats | None = None  # the center's stain, measured over its batches so far

    @property
    def label(self) -> str:
        """The ``adaptation`` column of the slides table."""
        if self.version is None:  # never saved: the source, or adapted without persistence
            return f"{self.method}:{'episodic' if self.batches else 'source'}"
        return f"{self.method}:{state_name(self.center)}/{self.version}"


def source_state(center: str, source: ModelRef, head: dict[str, torch.Tensor]) -> CenterState:
    return CenterState(
        center=center,
        source=source,
        student={k: v.clone() for k, v in head.items()},
        teacher={k: v.clone() for k, v in head.items()},
    )


def load_state(
    store: Store, center: str, source: ModelRef, head: dict[str, torch.Tensor]
) -> CenterState:
    """The center's latest state adapted from ``source``, else a fresh copy of the source."""
    name = state_name(center)
    try:
        card, weights = load_model(store, name, "latest")
    except StoreError:
        return source_state(center, source, head)
    meta = card.head
    if ModelRef.model_validate(meta["source"]) != source:
        log.info(
            "center %s: adapted state %s/%s comes from %s/%s, not %s/%s: starting from the source",
            center,
            name,
            card.version,
            meta["source"]["name"],
            meta["source"]["version"],
            source.name,
            source.version,
        )
        return source_state(center, source, head)
    parts: dict[str, dict[str, torch.Tensor]] = {p: {} for p in _PARTS}
    for key, value in weights.items():
        part, _, rest = key.partition(".")
        parts[part][rest] = value
    return CenterState(
        center=center,
        source=source,
        student=parts["student"],
        teacher=parts["teacher"],
        norms=parts["norm"],
        version=card.version,
        method=str(meta.get("method", "none")),
        batches=list(meta.get("batches", [])),
        resets=int(meta.get("resets", 0)),
        drift=float(meta.get("drift", 0.0)),
        stain=StainStats.model_validate(meta["stain"]) if meta.get("stain") else None,
    )


def save_state(
    store: Store, state: CenterState, classifier: ModelCard, note: dict | None = None
) -> str:
    """Commit ``state`` as the center's newest version; returns it (and sets state.version)."""
    weights = {f"student.{k}": v for k, v in state.student.items()}
    weights |= {f"teacher.{k}": v for k, v in state.teacher.items()}
    weights |= {f"norm.{k}": v for k, v in state.norms.items()}
    card = ModelCard(
        name=state_name(state.center),
        architecture=classifier.architecture,
        task="adapted",
        classes=classifier.classes,
        head={
            "center": state.center,
            "source": state.source.model_dump(),
            "method": state.method,
            "parent": state.version,
            "batches": state.batches,
            "resets": state.resets,
            "drift": state.drift,
            "stain": state.stain.model_dump() if state.stain else None,
            **(note or {}),
        },
        tiling=classifier.tiling,
        normalization=classifier.normalization,
        synthetic=classifier.synthetic,
    )
    state.version = save_model(store, card, weights)
    return state.version


def history(store: Store, center: str) -> list[ModelCard]:
    """Every committed version of the center's state, oldest first."""
    name = state_name(center)
    return [load_card(store, name, v) for v in list_versions(store, name)]


def rollback(store: Store, center: str, to_version: str) -> str:
    """Make ``to_version`` the center's current state again, as a new version; returns it."""
    name = state_name(center)
    current = latest_version(store, name)
    card, weights = load_model(store, name, to_version)
    copy = card.model_copy(
        update={
            "version": None,
            "weights_sha256": None,
            "created_at": "",
            "head": card.head | {"parent": current, "rolled_back_to": to_version},
        }
    )
    version = save_model(store, copy, weights)
    log.info("center %s: rolled back to %s as %s/%s", center, to_version, name, version)
    return version
