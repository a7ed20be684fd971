"""Import published weights into the store: ``ccs models import``.

Every file is read (``torch.load`` with ``weights_only``: a checkpoint cannot run code),
converted and checked before anything is written, so a wrong, truncated or unexpected file
leaves the store as it was, with one error naming the file and what is wrong. Each imported
model's card carries the source file's sha256 and where it comes from and under what terms.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict

from smartccs.errors import CCSError
from smartccs.ids import validate_id
from smartccs.models.artifacts import (
    Architecture,
    ModelCard,
    load_card,
    new_version,
    save_model,
)
from smartccs.models.compose import DEFAULT_THRESHOLD, check_threshold, compose_classifier
from smartccs.models.deformable_detr import REFERENCE_SHAPE, DetectorSpec, DetrShape, target_shapes
from smartccs.models.detr_keys import to_transformers
from smartccs.models.dinov2_keys import to_timm
from smartccs.models.encoder import build_from
from smartccs.models.refs import ModelRef
from smartccs.models.slide_head import meanmil_state, prototype_state
from smartccs.models.zoo import ZOO, ZooEntry
from smartccs.store import Store
from smartccs.taxonomy import GRADES

Role = Literal["encoder", "slide_head", "prototypes", "cell_detector", "classifier"]
SMART_CCS = ZOO["smart-ccs-vitl14"]
REFERENCE = "github.com/hjiangaz/Smart-CCS (Cls-WSI)"
DETECTOR_SOURCE = (
    "the Det-cell detector checkpoint of the Smart-CCS release (github.com/hjiangaz/Smart-CCS, "
    "Google Drive link in Det-cell/README.md)"
)


class SourceFile(BaseModel):
    """The published file a model was imported from, on its card."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str
    sha256: str
    bytes: int
    provenance: str
    licence: str


class Imported(BaseModel):
    """One model written by an import: what ``ccs models import`` prints."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role
    ref: str
    source: str
    sha256: str


def read_checkpoint(path: Path) -> tuple[Any, SourceFile]:
    """The file's contents, loaded without running code, and its provenance stub."""
    try:
        with path.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        size = path.stat().st_size
    except OSError as exc:
        raise CCSError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        raw = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # truncated zip, pickle of code, not a checkpoint at all
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0][:200]
        raise CCSError(f"{path}: not a readable PyTorch checkpoint ({why})") from None
    stub = SourceFile(
        file=path.name,
        sha256=digest,
        bytes=size,
        provenance="",
        licence="",
    )
    return raw, stub


def prepare_encoder(path: Path, entry: ZooEntry, name: str) -> tuple[ModelCard, dict]:
    """The card and timm state dict of an encoder file of kind ``entry``."""
    raw, source = read_checkpoint(path)
    with torch.device("meta"):
        model = build_from(entry.architecture)
    target = {k: v.shape for k, v in model.state_dict().items()}
    try:
        state, conversion = to_timm(raw, entry.layout, target)
    except CCSError as exc:
        raise CCSError(f"{path}: {exc} (read as {entry.name}, layout {entry.layout})") from None
    source = source.model_copy(update={"provenance": entry.source, "licence": entry.licence})
    card = ModelCard(
        name=name,
        version=new_version(),
        architecture=entry.architecture,
        task="encoder",
        head={
            "kind": entry.name,
            "embedding": entry.embedding,
            "embed_dim": entry.embed_dim,
            "input_px": entry.input_px,
            "crop": entry.crop.model_dump(mode="json") if entry.crop else None,
            "conversion": conversion.model_dump(mode="json"),
            "source": source.model_dump(mode="json"),
        },
        tiling=entry.tiling,
        normalization=entry.normalization,
        synthetic=False,
    )
    return card, state


def _reference_part(
    path: Path,
    entry: ZooEntry,
    name: str,
    encoder: ModelRef | None,
    task: Role,
    read: Callable[[Any], tuple[dict, BaseModel]],
    width_error: Callable[[Any], str | None],
    published: str,
) -> tuple[ModelCard, dict]:
    """A reference file over encoder kind ``entry``: read, checked against the encoder's
    width, carded with its provenance (``read`` gives the tensors and the header)."""
    raw, source = read_checkpoint(path)
    try:
        state, header = read(raw)
    except CCSError as exc:
        raise CCSError(f"{path}: {exc}") from None
    if why := width_error(header):
        raise CCSError(f"{path}: {why}, the {entry.name} encoder gives {entry.embed_dim}-d")
    source = source.model_copy(
        update={"provenance": f"{published}, {REFERENCE}", "licence": SMART_CCS.licence}
    )
    return _head_card(name, task, entry, source, header.model_dump(), encoder), state


def prepare_slide_head(
    path: Path, entry: ZooEntry, name: str, encoder: ModelRef | None
) -> tuple[ModelCard, dict]:
    """The card and state dict of a reference ``MeanMIL.pth`` over encoder kind ``entry``."""

    def width_error(shape: Any) -> str | None:
        return None if shape.in_dim == entry.embed_dim else f"MeanMIL takes {shape.in_dim}-d cells"

    return _reference_part(path, entry, name, encoder, "slide_head", meanmil_state, width_error,
                           "MeanMIL.pth")  # fmt: skip


def prepare_prototypes(
    path: Path, entry: ZooEntry, name: str, encoder: ModelRef | None
) -> tuple[ModelCard, dict]:
    """The card and ``class_<i>`` tensors of a reference ``proto_bank.pth``."""

    def width_error(bank: Any) -> str | None:
        return None if bank.feat_dim == entry.embed_dim else f"feat_dim is {bank.feat_dim}"

    return _reference_part(path, entry, name, encoder, "prototypes", prototype_state,
                           width_error, "proto_bank.pth")  # fmt: skip


def prepare_cell_detector(path: Path, name: str, shape: DetrShape) -> tuple[ModelCard, dict]:
    """The card and transformers state dict of a reference Deformable-DETR checkpoint.

    Task ``cell_detector``, not ``detector``: the engine builds every ``detector`` card with
    smartccs.models.detector.build_detector, so this one must not pass for one;
    ``head["implementation"]`` names the network that runs it."""
    raw, source = read_checkpoint(path)
    try:
        state, conversion = to_transformers(raw, target_shapes(shape))
    except CCSError as exc:
        raise CCSError(f"{path}: {exc} (read as Deformable DETR, {shape.backbone})") from None
    source = source.model_copy(update={"provenance": DETECTOR_SOURCE, "licence": SMART_CCS.licence})
    spec = DetectorSpec()
    card = ModelCard(
        name=name,
        version=new_version(),
        architecture=Architecture(timm_name=shape.backbone),
        task="cell_detector",
        classes=list(spec.classes),
        head={
            "implementation": "transformers-deformable-detr",
            "detr": shape.model_dump(),
            "spec": spec.model_dump(mode="json"),
            "conversion": conversion.model_dump(mode="json"),
            "source": source.model_dump(mode="json"),
        },
        tiling=SMART_CCS.tiling,
        normalization=spec.normalization,
        synthetic=False,
    )
    return card, state


def _head_card(
    name: str,
    task: Role,
    entry: ZooEntry,
    source: SourceFile,
    head: dict[str, Any],
    encoder: ModelRef | None,
) -> ModelCard:
    """A slide head's or bank's card: the encoder kind's architecture, tiling and
    normalisation, as the platform's own classifier cards carry their encoder's."""
    return ModelCard(
        name=name,
        version=new_version(),
        architecture=entry.architecture,
        task=task,
        classes=list(GRADES),
        head={
            **head,
            "encoder_kind": entry.name,
            "encoder": encoder.model_dump() if encoder else None,
            "source": source.model_dump(mode="json"),
        },
        tiling=entry.tiling,
        normalization=entry.normalization,
        synthetic=False,
    )


def import_models(
    store: Store,
    *,
    encoder: Path | None = None,
    kind: ZooEntry = SMART_CCS,
    mil: Path | None = None,
    prototypes: Path | None = None,
    detector: Path | None = None,
    detector_shape: DetrShape | None = None,
    name: str | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> list[Imported]:
    """Read and check every file given, then save them; returns what was written.

    Models are named ``NAME`` (the encoder), ``NAME-meanmil``, ``NAME-prototypes`` and
    ``NAME-detector`` (the Det-cell Deformable DETR, of ``detector_shape``, by default the
    reference's);
    ``NAME`` defaults to the encoder kind's name, or ``smart-ccs`` without an encoder. The
    head and bank cards name the encoder imported with them, if any. With an encoder, a head
    and a detector, the classifier ``NAME-classifier`` that screens with them is composed too
    (smartccs.models.compose; called positive from ``threshold``)."""
    if not (encoder or mil or prototypes or detector):
        raise CCSError("nothing to import: give --encoder, --mil, --prototypes or --detector")
    check_threshold(threshold)
    base = validate_id(name or (kind.name if encoder else "smart-ccs"), "model name")
    prepared: list[tuple[Role, Path, ModelCard, dict]] = []
    enc_ref = None
    if encoder:
        card, state = prepare_encoder(encoder, kind, base)
        enc_ref = ModelRef(name=card.name, version=str(card.version))
        prepared.append(("encoder", encoder, card, state))
    if mil:
        card, state = prepare_slide_head(mil, kind, validate_id(f"{base}-meanmil"), enc_ref)
        prepared.append(("slide_head", mil, card, state))
    if prototypes:
        bank_name = validate_id(f"{base}-prototypes")
        card, state = prepare_prototypes(prototypes, kind, bank_name, enc_ref)
        prepared.append(("prototypes", prototypes, card, state))
    if detector:
        det_name = validate_id(f"{base}-detector")
        card, state = prepare_cell_detector(detector, det_name, detector_shape or REFERENCE_SHAPE)
        prepared.append(("cell_detector", detector, card, state))
    done = []
    for role, path, card, state in prepared:
        version = save_model(store, card, state)
        done.append(
            Imported(
                role=role,
                ref=f"{card.name}/{version}",
                source=str(path),
                sha256=card.head["source"]["sha256"],
            )
        )
    refs = {d.role: d.ref for d in done}
    if {"encoder", "slide_head", "cell_detector"} <= set(refs):
        composed = compose_classifier(
            store,
            name=validate_id(f"{base}-classifier"),
            encoder=refs["encoder"],
            slide_head=refs["slide_head"],
            detector=refs["cell_detector"],
            prototypes=refs.get("prototypes"),
            threshold=threshold,
        )
        done.append(
            Imported(
                role="classifier",
                ref=composed.label,
                source="composed of the models above",
                sha256=str(load_card(store, composed.name, composed.version).weights_sha256),
            )
        )
    return done
