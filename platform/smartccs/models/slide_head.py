"""The Smart-CCS slide head (MeanMIL) and its test-time-adaptation prototype bank.

MeanMIL scores every cell with the same two-layer MLP (Linear -> ReLU -> Linear to the seven
grades) and averages the cells' logits: a slide's grade logits are the mean of its cells'. The
reference's module (Cls-WSI/lib/mil_model.py) puts an optional Dropout between the ReLU and the
last Linear, so its last layer is ``head.2`` without dropout and ``head.3`` with it; both are
read, and stored here under ``head.2`` (dropout does nothing at inference).

The prototype bank (Cls-WSI/build_memory_bank.py) keeps, per grade, the mean cell embeddings of
the ``top_w`` retrospective slides the head was most confident of, for the reference's TTA.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from smartccs.errors import CCSError
from smartccs.models.mil import pooled_embedding
from smartccs.taxonomy import GRADES

BANK_KEYS = frozenset({"proto_bank", "n_classes", "top_w", "feat_dim"})


class HeadFileError(CCSError):
    """A slide-head or prototype file that is not what the reference writes."""


class MeanMILShape(BaseModel):
    """The sizes a MeanMIL state dict implies, kept on the card to rebuild the module."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    in_dim: int
    hidden: int
    n_classes: int = len(GRADES)
    activation: str = Field(default="relu", description="the reference config's act")
    pooling: str = Field(default="mean of per-cell logits")


class MeanMILHead(nn.Module):
    """(N, D) cell embeddings -> (7,) grade logits; (B, N, D) -> (B, 7)."""

    card: Any = None
    """The model card, once loaded from the store (smartccs.models.loaders)."""

    def __init__(self, shape: MeanMILShape):
        super().__init__()
        self.shape = shape
        self.head = nn.Sequential(
            nn.Linear(shape.in_dim, shape.hidden),
            nn.ReLU(),
            nn.Linear(shape.hidden, shape.n_classes),
        )

    def cell_logits(self, cells: torch.Tensor) -> torch.Tensor:
        """Each cell's own grade logits, (…, N, 7)."""
        return self.head(cells)

    def forward(self, cells: torch.Tensor) -> torch.Tensor:
        if cells.dim() not in (2, 3) or cells.shape[-2] == 0:
            raise ValueError(f"expected (N, D) or (B, N, D) with N >= 1, got {tuple(cells.shape)}")
        return self.cell_logits(cells).mean(dim=-2)


EMPTY_BAG_LOGIT = -30.0
"""The abnormal grades' logit for a slide with no detected abnormal cell (NILM's is 0)."""


class MeanMILBag(nn.Module):
    """MeanMIL over a slide's bag, the screening engine's input: (B, 6, K, D) embeddings of the
    top-K cells per abnormal class with their (B, 6, K) scores and mask -> (B, 7) logits, the
    mean of the kept cells' logits, as the reference averages over its up to 6·K cells.

    A slide on which the detector found no abnormal cell has nothing to average: it is called
    NILM (the reference would embed one blank crop instead, an artefact of its loader). The
    reference's prototype bank rides along as buffers, for smartccs adaptation."""

    def __init__(self, shape: MeanMILShape, n_prototypes: int = 0):
        super().__init__()
        self.mil = MeanMILHead(shape)
        self.register_buffer("prototypes", torch.zeros(n_prototypes, shape.in_dim))
        self.register_buffer("prototype_grades", torch.zeros(n_prototypes, dtype=torch.long))

    def forward(
        self, embeddings: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(embeddings.dtype)
        n = m.sum((-3, -2))  # (B, 1)
        mean = (self.mil.cell_logits(embeddings) * m).sum((-3, -2)) / n.clamp_min(1)
        empty = torch.full_like(mean, EMPTY_BAG_LOGIT)
        empty[..., GRADES.index("NILM")] = 0.0
        return torch.where(n > 0, mean, empty)

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mil.head[1](self.mil.head[0](x)), dim=-1)

    def represent(
        self, embeddings: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """(B, hidden) unit vectors: the slide's mean cell embedding through the head's hidden
        layer. The reference projects the same mean, and its prototypes, through a fresh
        128-d MLP trained during adaptation; the head's own hidden layer plays that part here,
        so a center's adapted state is the head's state alone."""
        return self._hidden(pooled_embedding(embeddings, mask))

    def prototype_views(
        self, scores: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The bank's prototypes as ``represent`` sees a slide, and each one's grade."""
        if not len(self.prototypes):
            return None
        return self._hidden(self.prototypes), self.prototype_grades


def meanmil_state(raw: Any) -> tuple[dict[str, torch.Tensor], MeanMILShape]:
    """Our state dict and shape from the reference's ``MeanMIL.pth`` state dict."""
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise HeadFileError("not a state dict of tensors")
    last = 3 if "head.3.weight" in raw else 2
    wanted = [f"head.{i}.{p}" for i in (0, last) for p in ("weight", "bias")]
    for key in wanted:
        if key not in raw:
            raise HeadFileError(f"missing tensor {key!r} (MeanMIL has head.0 and head.2 or .3)")
    extra = sorted(set(map(str, raw)) - set(wanted))
    if extra:
        raise HeadFileError(f"unexpected key {extra[0]!r} (not a MeanMIL state dict)")
    w0, b0, w1, b1 = (raw[k] for k in wanted)
    if w0.dim() != 2 or w1.dim() != 2:
        raise HeadFileError("head.0.weight and the last weight must be matrices")
    shape = MeanMILShape(in_dim=w0.shape[1], hidden=w0.shape[0], n_classes=w1.shape[0])
    expected = {
        wanted[1]: (shape.hidden,),
        wanted[2]: (len(GRADES), shape.hidden),
        wanted[3]: (len(GRADES),),
    }
    for key, size in expected.items():
        if tuple(raw[key].shape) != size:
            raise HeadFileError(
                f"{key!r} has shape {tuple(raw[key].shape)}, expected {size} for "
                f"{len(GRADES)} grades ({', '.join(GRADES)})"
            )
    state = {"head.0.weight": w0, "head.0.bias": b0, "head.2.weight": w1, "head.2.bias": b1}
    return state, shape


class PrototypeBank(BaseModel):
    """The bank's header, on the card; the tensors are ``class_<i>`` in the weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_classes: int
    top_w: int
    feat_dim: int
    counts: list[int] = Field(description="prototypes per class (at most top_w)")


def prototype_state(raw: Any) -> tuple[dict[str, torch.Tensor], PrototypeBank]:
    """``class_<i>`` tensors and the header from a reference ``proto_bank.pth``."""
    if not isinstance(raw, Mapping) or set(map(str, raw)) != BANK_KEYS:
        found = sorted(map(str, raw)) if isinstance(raw, Mapping) else type(raw).__name__
        raise HeadFileError(f"expected the keys {sorted(BANK_KEYS)}, found {found}")
    bank, n, top_w, dim = (raw[k] for k in ("proto_bank", "n_classes", "top_w", "feat_dim"))
    if not all(type(v) is int and v > 0 for v in (n, top_w, dim)):
        raise HeadFileError("n_classes, top_w and feat_dim must be positive integers")
    if n != len(GRADES):
        raise HeadFileError(f"n_classes is {n}, the head's grades are {len(GRADES)}")
    if not isinstance(bank, Mapping) or set(bank) != set(range(n)):
        keys = list(bank) if isinstance(bank, Mapping) else type(bank).__name__
        raise HeadFileError(f"proto_bank must map class 0..{n - 1} to tensors, has {keys}")
    state, counts = {}, []
    for c in range(n):
        t = bank[c]
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            raise HeadFileError(f"proto_bank[{c}] is not a (k, feat_dim) float tensor")
        if t.shape[1] != dim:
            raise HeadFileError(f"proto_bank[{c}] has width {t.shape[1]}, feat_dim says {dim}")
        if not 1 <= t.shape[0] <= top_w:
            raise HeadFileError(f"proto_bank[{c}] holds {t.shape[0]} prototypes, top_w is {top_w}")
        state[f"class_{c}"] = t
        counts.append(int(t.shape[0]))
    return state, PrototypeBank(n_classes=n, top_w=top_w, feat_dim=dim, counts=counts)


def prototype_tensors(state: Mapping[str, torch.Tensor], bank: PrototypeBank) -> dict[int, Any]:
    """The bank as the reference holds it: class index -> (k, feat_dim) tensor."""
    return {c: state[f"class_{c}"] for c in range(bank.n_classes)}
