"""The slide heads a classifier card can hold, behind one interface.

A classifier trained here holds the platform's MIL head (smartccs.models.mil); one composed of
the Smart-CCS release holds the reference's MeanMIL (smartccs.models.slide_head). Screening,
prediction and smartccs adaptation use only what ``BagHead`` says, so both run the same path.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from smartccs.models.artifacts import ModelCard
from smartccs.models.mil import MILConfig, MILHead
from smartccs.models.slide_head import MeanMILBag, MeanMILShape


class BagHead(Protocol):
    """A slide's bag (B, 6, K, D) embeddings, (B, 6, K) scores and mask -> (B, 7) logits."""

    def __call__(
        self, embeddings: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor: ...

    def represent(
        self, embeddings: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """(B, F) unit vectors: the slide as the head sees it."""
        ...

    def prototype_views(
        self, scores: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(P, F) prototypes as ``represent`` sees slides, and their (P,) grades; or None."""
        ...

    def eval(self) -> nn.Module: ...


def build_bag_head(card: ModelCard, state: dict[str, torch.Tensor]) -> nn.Module:
    """The slide head a classifier card describes, with its weights, in eval mode."""
    if card.head.get("kind") == "meanmil":
        head: nn.Module = MeanMILBag(
            MeanMILShape.model_validate(card.head["meanmil"]), len(state.get("prototypes", []))
        )
    else:
        head = MILHead(int(card.head["dim"]), MILConfig.model_validate(card.head["mil"]))
    head.load_state_dict(state)
    return head.eval()
