"""Imported models as ready-to-run modules: ``load_encoder``, ``load_slide_head``,
``load_prototypes`` and ``load_cell_detector``.

Each is built from its card alone (timm with ``pretrained=False``, weights from the store) and
returned in eval mode. The encoder maps (B, 3, H, W) pixels, already normalised with the card's
mean/std, to (B, D) embeddings by the rule its source defines; the slide head maps a slide's
(N, D) cell embeddings to its 7 grade logits (smartccs.taxonomy.GRADES); the cell detector maps
[0, 1] RGB tiles and their level-0 regions to level-0 boxes of the 6 abnormal classes.
"""

from __future__ import annotations

from typing import get_args

import torch
from torch import nn

from smartccs.errors import StoreError
from smartccs.models.artifacts import ModelCard, Task, load_model, require_model
from smartccs.models.deformable_detr import CellDetector, DetectorSpec, DetrShape, build_network
from smartccs.models.encoder import build_from, input_size
from smartccs.models.materialize import with_weights
from smartccs.models.refs import ModelRef
from smartccs.models.slide_head import (
    MeanMILHead,
    MeanMILShape,
    PrototypeBank,
    prototype_tensors,
)
from smartccs.models.zoo import EmbeddingRule
from smartccs.store import Store, open_store
from smartccs.taxonomy import GRADES


class Encoder(nn.Module):
    """A timm ViT and the rule that turns its tokens into one embedding."""

    def __init__(self, backbone: nn.Module, rule: EmbeddingRule, card: ModelCard):
        super().__init__()
        self.backbone = backbone
        self.rule = rule
        self.card = card

    @property
    def embed_dim(self) -> int:
        return int(self.card.head["embed_dim"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(x)  # after the final norm
        cls = tokens[:, 0]
        if self.rule == "cls":
            return cls
        patches = tokens[:, int(self.backbone.num_prefix_tokens) :]  # registers excluded
        return torch.cat([cls, patches.mean(dim=1)], dim=-1)


def _card_and_weights(store_uri: str | Store, ref: str, task: Task) -> tuple[ModelCard, dict]:
    store = store_uri if isinstance(store_uri, Store) else open_store(uri=store_uri)
    parsed = ModelRef.parse(ref)
    card = require_model(store, parsed.name, parsed.version or "latest", task)
    return load_model(store, card.name, str(card.version))


def load_encoder(store_uri: str | Store, ref: str) -> Encoder:
    """The encoder ``ref`` (``name`` or ``name/version``) of the store, in eval mode."""
    card, state = _card_and_weights(store_uri, ref, "encoder")
    if card.head.get("embedding") not in get_args(EmbeddingRule):
        raise StoreError(f"encoder {card.name}/{card.version} was not imported (no embedding)")
    net, _, _ = cell_encoder(card, state)
    return net.eval()


def cell_encoder(card: ModelCard, state: dict) -> tuple[nn.Module, int, int]:
    """The network that embeds cell crops for an encoder card, its input side in pixels and
    its embedding's width: an imported encoder by its source's embedding rule, one trained
    here (whose timm head is its embedding) as timm returns it."""
    backbone = with_weights(lambda: build_from(card.architecture), state)
    rule = card.head.get("embedding")
    if rule in get_args(EmbeddingRule):
        encoder = Encoder(backbone, rule, card)
        return encoder, int(card.head["input_px"]), encoder.embed_dim
    return backbone, input_size(backbone), int(backbone.num_features)


def load_slide_head(store_uri: str | Store, ref: str) -> MeanMILHead:
    """The MeanMIL slide head ``ref`` of the store, in eval mode; ``.card`` holds its card."""
    card, state = _card_and_weights(store_uri, ref, "slide_head")
    head = MeanMILHead(card.head_fields(MeanMILShape))
    head.load_state_dict(state, strict=True)
    head.card = card
    return head.eval()


def load_prototypes(
    store_uri: str | Store, ref: str
) -> tuple[PrototypeBank, dict[int, torch.Tensor]]:
    """The prototype bank ``ref``: its header and, per grade index, its (k, D) prototypes."""
    card, state = _card_and_weights(store_uri, ref, "prototypes")
    bank = card.head_fields(PrototypeBank)
    if bank.n_classes != len(GRADES):
        raise StoreError(f"prototypes {card.name}/{card.version}: {bank.n_classes} classes")
    return bank, prototype_tensors(state, bank)


def load_cell_detector(store_uri: str | Store, ref: str) -> CellDetector:
    """The imported Det-cell detector ``ref`` (``name`` or ``name/version``), in eval mode;
    ``.detect(tiles, regions)`` gives each tile's level-0 detections, ``.card`` its card."""
    return cell_detector(*_card_and_weights(store_uri, ref, "cell_detector"))


def cell_detector(card: ModelCard, state: dict) -> CellDetector:
    """The imported Deformable DETR a ``cell_detector`` card and its weights describe."""
    if card.head.get("implementation") != "transformers-deformable-detr":
        raise StoreError(f"cell detector {card.name}/{card.version}: unknown implementation")
    shape = DetrShape.model_validate(card.head["detr"])
    network = with_weights(lambda: build_network(shape), state)
    spec = DetectorSpec.model_validate(card.head["spec"])
    return CellDetector(network, spec, card).eval()
