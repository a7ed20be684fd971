"""A model version as every part of the platform names it: ``name/version``.

Slide rows, service model ids, classifier cards and job configs all refer to a model the same
way, so the reference and its one text form live here, below everything that uses them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from smartccs.models.artifacts import ModelCard, latest_version
from smartccs.store import Store


class ModelRef(BaseModel):
    """One committed model version (``version`` may be ``latest`` until pinned)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: str

    @property
    def label(self) -> str:
        """``name/version``: the form slide rows and the service's model ids carry."""
        return f"{self.name}/{self.version}"

    @classmethod
    def parse(cls, label: str) -> ModelRef:
        name, _, version = label.partition("/")
        return cls(name=name, version=version)


def pin(store: Store, ref: ModelRef) -> ModelRef:
    """``ref`` with ``latest`` resolved, so that every stage of a run uses one version even if
    a newer one is committed meanwhile."""
    if ref.version != "latest":
        return ref
    return ModelRef(name=ref.name, version=latest_version(store, ref.name))


def encoder_ref(detector: ModelCard) -> ModelRef:
    """The frozen encoder that embeds a detector's cells: the pretrained encoder it was
    finetuned from, or the card's own ``embedder`` (a detector trained from random weights)."""
    own = detector.head.get("embedder")
    if own:
        return ModelRef(name=own["name"], version=own["version"])
    cfg = detector.training_config
    return ModelRef(name=cfg["encoder_model"], version=cfg["encoder_version"])
