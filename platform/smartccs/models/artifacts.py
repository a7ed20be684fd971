"""Versioned model artifacts: safetensors weights plus a JSON card, committed like a batch.

A version lives under ``models/<name>/<version>/`` as ``weights.safetensors`` and ``card.json``
and becomes visible only when its ``_COMMITTED`` marker is written (create-if-absent), so a
crashed save leaves nothing a reader would load, and a committed version is never overwritten.
``models/<name>/LATEST`` names the newest committed version. The card records the weights'
sha256 and the marker records the card's, so tampering after the commit is refused on load.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from smartccs import layout
from smartccs.checksums import data_sha256 as data_sha256  # re-exported: cards hash their data
from smartccs.commits import read_commit, read_pinned
from smartccs.errors import AlreadyCommittedError, CCSError, StoreError
from smartccs.ids import Id, validate_id
from smartccs.slide.tiling import TilingConfig
from smartccs.store import Store

M = TypeVar("M", bound=BaseModel)

WEIGHTS_NAME = "weights.safetensors"
CARD_NAME = "card.json"
LATEST_NAME = "LATEST"

Task = Literal[
    "encoder", "detector", "classifier", "adapted", "slide_head", "prototypes", "cell_detector"
]
"""``adapted``: a center's test-time-adapted state (smartccs.adaptation.state). ``slide_head``
and ``prototypes``: an imported Smart-CCS MeanMIL head and its TTA prototype bank
(smartccs.models.importer). ``cell_detector``: the reference's imported Deformable DETR
(smartccs.models.deformable_detr), a task of its own because ``detector`` cards are built by
smartccs.models.detector.build_detector, which the screening engine trusts them to be."""


class Architecture(BaseModel):
    """What to build before loading the weights: a timm model name and its keyword arguments."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timm_name: str = Field(description="e.g. vit_large_patch14_dinov2")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="timm.create_model kwargs")


class Normalization(BaseModel):
    """Per-channel RGB mean/std applied to [0, 1] pixels before the network."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


class ModelCard(BaseModel):
    """Everything needed to use a model without the code or data that trained it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Id
    version: Id | None = Field(default=None, description="assigned by save_model")
    architecture: Architecture
    task: Task
    classes: list[str] = Field(default_factory=list, description="output classes, in order")
    head: dict[str, Any] = Field(
        default_factory=dict, description="task head on top of the architecture, to rebuild it"
    )
    tiling: TilingConfig = Field(description="mpp and tile size the model was trained at")
    normalization: Normalization = Normalization()
    training_config: dict[str, Any] = Field(default_factory=dict)
    training_config_sha256: str = Field(default="", description="config_sha256 of the above")
    data_manifest_sha256: str = Field(default="", description="data_sha256 of the training data")
    metrics: dict[str, float] = Field(default_factory=dict)
    created_at: str = Field(default="", description="ISO 8601 UTC; set by save_model if empty")
    synthetic: bool = Field(description="trained on synthetic data: results say nothing clinical")
    weights_sha256: str | None = Field(default=None, description="set by save_model")

    def head_fields(self, model: type[M]) -> M:
        """The header an import wrote among the ``head`` entries (next to its source), as
        ``model`` (a MeanMIL shape, a prototype bank's header)."""
        return model.model_validate({k: self.head[k] for k in model.model_fields if k in self.head})


class _Commit(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: str
    card_sha256: str
    committed_at: str


def config_sha256(config: dict[str, Any]) -> str:
    """Hash of a config independent of key order, so equal configs hash equal."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


_last: datetime | None = None


def new_version(now: datetime | None = None) -> str:
    """A version id that sorts by creation time (to the millisecond, and strictly increasing
    within a process, so LATEST follows a quick succession of saves such as a center's adapted
    states), with a random tail so two processes never clash."""
    global _last
    now = now or datetime.now(UTC)
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)
    if _last is not None and now <= _last:
        now = _last + timedelta(milliseconds=1)
    _last = now
    stamp = f"{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}"
    return validate_id(f"v{stamp}-{secrets.token_hex(3)}", "model version")


def is_committed(store: Store, name: str, version: str) -> bool:
    return store.exists(layout.model(name, version), layout.COMMIT_MARKER)


def list_versions(store: Store, name: str) -> list[str]:
    """Committed versions of a model, oldest first; uncommitted (crashed) saves are skipped."""
    found = []
    for v in store.list_dirs("models", validate_id(name, "model name")):
        try:
            committed = is_committed(store, name, v)
        except ValueError:  # a folder whose name is not a valid id is not ours
            continue
        if committed:
            found.append(v)
    return sorted(found)


def latest_version(store: Store, name: str) -> str:
    """The version ``models/<name>/LATEST`` names."""
    key = f"models/{validate_id(name, 'model name')}/{LATEST_NAME}"
    try:
        return validate_id(json.loads(store.read_bytes(key))["version"], "model version")
    except StoreError:
        versions = list_versions(store, name)
        if versions:  # e.g. versions copied without their pointer
            raise StoreError(
                f"model {name!r} has no {LATEST_NAME} pointer in {store.uri()}: name one of its "
                f"committed versions, {name}/<version> ({', '.join(versions)})"
            ) from None
        raise StoreError(f"model {name!r} has no committed version in {store.uri()}") from None
    except (ValueError, KeyError, TypeError):
        raise StoreError(f"{store.uri(key)} is not a valid LATEST pointer") from None


def save_model(store: Store, card: ModelCard, state_dict: dict[str, Any]) -> str:
    """Write weights and card, commit them, move LATEST; returns the version id.

    The version is ``card.version`` if set (a retry of the same save), else a new one.
    """
    from safetensors.torch import save as save_safetensors

    version = card.version or new_version()
    prefix = layout.model(card.name, version)
    if is_committed(store, card.name, version):
        raise AlreadyCommittedError(
            f"{store.uri(prefix)} is already committed; model versions are never overwritten"
        )
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    weights = save_safetensors(tensors)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    card = card.model_copy(
        update={
            "version": version,
            "weights_sha256": hashlib.sha256(weights).hexdigest(),
            "created_at": card.created_at or now,
        }
    )
    card_bytes = card.model_dump_json(indent=2).encode()
    store.write_bytes(f"{prefix}/{WEIGHTS_NAME}", weights)
    store.write_bytes(f"{prefix}/{CARD_NAME}", card_bytes)
    record = _Commit(
        name=card.name,
        version=version,
        card_sha256=hashlib.sha256(card_bytes).hexdigest(),
        committed_at=now,
    )
    if not store.put_if_absent(
        f"{prefix}/{layout.COMMIT_MARKER}", record.model_dump_json().encode()
    ):
        raise AlreadyCommittedError(f"{store.uri(prefix)} was committed by someone else meanwhile")
    _advance_latest(store, card.name, version)
    return version


def _advance_latest(store: Store, name: str, version: str) -> None:
    """Point LATEST at ``version`` unless it already names a newer one (versions sort by time)."""
    try:
        current = latest_version(store, name)
    except StoreError:
        current = ""
    if version > current:
        body = json.dumps({"name": name, "version": version}).encode()
        store.write_bytes(f"models/{name}/{LATEST_NAME}", body)


def load_card(store: Store, name: str, version: str = "latest") -> ModelCard:
    """The card of a committed version, checked against its commit marker."""
    version = latest_version(store, name) if version == "latest" else version
    prefix = layout.model(name, version)
    record = read_commit(store, prefix, _Commit, "model version")
    card_bytes = read_pinned(store, prefix, CARD_NAME, record.card_sha256, "version")
    card = ModelCard.model_validate_json(card_bytes)
    if (card.name, card.version) != (name, version):
        raise StoreError(
            f"{store.uri(prefix, CARD_NAME)} names {card.name}/{card.version}, "
            f"but lives under {name}/{version}"
        )
    return card


def load_model(store: Store, name: str, version: str = "latest") -> tuple[ModelCard, dict]:
    """Card and state dict of a committed version; weights that do not match the card fail."""
    from safetensors.torch import load as load_safetensors

    card = load_card(store, name, version)
    prefix = layout.model(name, card.version)
    weights = store.read_bytes(prefix, WEIGHTS_NAME)
    if hashlib.sha256(weights).hexdigest() != card.weights_sha256:
        raise StoreError(
            f"{store.uri(prefix, WEIGHTS_NAME)}: sha256 differs from the card; refusing to load"
        )
    return card, load_safetensors(weights)


def models_of(store: Store, task: Task) -> list[str]:
    """Names of the models in ``store`` whose newest committed version is a ``task``."""
    names = []
    for name in store.list_dirs("models"):
        try:
            versions = list_versions(store, name)
            if versions and load_card(store, name, versions[-1]).task == task:
                names.append(name)
        except (CCSError, ValueError):  # not a model folder, or a broken version
            continue
    return names


def require_model(store: Store, name: str, version: str, task: Task) -> ModelCard:
    """The card of model ``name`` (``version``, or ``latest``) if it is a committed ``task``;
    else one error naming it, the store and the models of that task there. A check to run
    before a job starts anything (``ccs screen`` checks its classifier before Ray starts)."""
    where = store.uri("models")

    def hint() -> str:
        others = models_of(store, task)
        return f"{task}s there: {', '.join(others)}" if others else f"it holds no {task}"

    try:
        card = load_card(store, name, version)
    except (CCSError, ValueError) as exc:
        label = name if version == "latest" else f"{name}/{version}"
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StoreError(f"no {task} {label!r} to load from {where}: {why}; {hint()}") from None
    if card.task != task:
        raise StoreError(
            f"model {name}/{card.version} in {where} is a {card.task}, not a {task}; {hint()}"
        )
    return card
