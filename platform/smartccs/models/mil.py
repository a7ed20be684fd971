"""The slide classifier: a multiple-instance head over each slide's top cells per class.

Input per slide: for each of the 6 abnormal classes the embeddings of its top-K detected cells
(frozen encoder), their detection scores and a mask for classes with fewer than K cells. Each
cell becomes a token (its embedding, projected, plus its class and score); tokens are pooled per
class, by a masked mean (mean-MIL, the reference's default), a mean weighted by each cell's
detection score (``score``) or gated attention (attention-MIL, Ilse et al. 2018), and the six
pooled vectors with each class's score summary give the 7 grade logits. Slide score =
1 - P(NILM).

Why ``score``: the top K of a class are the K highest-scoring detections whether or not a slide
has that many abnormal cells. On a slide with a handful of them (a small or sparse specimen)
most of the K are confident-looking normal cells, and a plain mean lets them outvote the few
real ones; weighting by the detector's confidence keeps the real ones in front.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from smartccs.taxonomy import ABNORMAL_CLASSES, GRADES

N_CLASSES = len(ABNORMAL_CLASSES)


class MILConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    pooling: Literal["mean", "score", "attention"] = "mean"
    hidden: int = Field(default=128, ge=8)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    top_k: int = Field(default=100, ge=1, description="cells per abnormal class per slide")


class MILHead(nn.Module):
    """(B, 6, K, D) embeddings, (B, 6, K) scores and mask -> (B, 7) grade logits."""

    def __init__(self, dim: int, cfg: MILConfig):
        super().__init__()
        h = cfg.hidden
        self.cfg = cfg
        self.token = nn.Sequential(nn.Linear(dim + 1, h), nn.GELU(), nn.Dropout(cfg.dropout))
        self.class_embed = nn.Parameter(torch.zeros(N_CLASSES, h))
        if cfg.pooling == "attention":
            self.att_v = nn.Linear(h, h // 2)
            self.att_u = nn.Linear(h, h // 2)
            self.att_w = nn.Linear(h // 2, 1)
        stats = 3  # per class: max score, mean score, share of K filled
        self.classify = nn.Sequential(
            nn.LayerNorm(N_CLASSES * (h + stats)),
            nn.Dropout(cfg.dropout),
            nn.Linear(N_CLASSES * (h + stats), len(GRADES)),
        )
        self.register_buffer("prototypes", torch.zeros(len(GRADES), dim))
        """Per grade, the mean cell embedding of the most confident training slides (for TTA)."""

    def pool(
        self, embeddings: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """(B, 6, h) pooled cell tokens per class (zeros for a class without cells)."""
        tokens = self.token(torch.cat([embeddings, scores.unsqueeze(-1)], dim=-1))
        tokens = tokens + self.class_embed[None, :, None, :]
        m = mask.unsqueeze(-1).to(tokens.dtype)
        if self.cfg.pooling == "mean":
            return (tokens * m).sum(2) / m.sum(2).clamp_min(1)
        if self.cfg.pooling == "score":
            w = scores.unsqueeze(-1).to(tokens.dtype) * m
            return (tokens * w).sum(2) / w.sum(2).clamp_min(1e-6)
        logits = self.att_w(torch.tanh(self.att_v(tokens)) * torch.sigmoid(self.att_u(tokens)))
        logits = logits.masked_fill(m == 0, -1e4)
        weights = torch.softmax(logits, dim=2) * m
        return (tokens * weights).sum(2)

    def represent(
        self, embeddings: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """(B, 6·h) unit vectors: the pooled cell tokens per class, the slide as the head sees
        it (what smartccs adaptation contrasts)."""
        return F.normalize(self.pool(embeddings, scores, mask).flatten(1), dim=-1)

    def prototype_views(
        self, scores: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The prototype bank seen as ``represent`` sees a slide, (7, 6·h), and each one's
        grade; None while the bank is empty. A prototype is a mean cell embedding, so it is
        given the score a kept cell of these slides usually has."""
        bank = self.prototypes
        if not bool(bank.abs().sum() > 0):
            return None
        m = mask.to(scores.dtype)
        typical = (scores * m).sum() / m.sum().clamp_min(1)
        tokens = self.token(torch.cat([bank, typical.expand(len(bank), 1)], dim=-1))
        per_class = tokens[:, None, :] + self.class_embed[None]  # (7, 6, h)
        return F.normalize(per_class.flatten(1), dim=-1), torch.arange(len(bank))

    def forward(
        self, embeddings: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        pooled = self.pool(embeddings, scores, mask)
        m = mask.to(scores.dtype)
        filled = m.sum(-1)
        stats = torch.stack(
            [
                (scores * m).amax(-1),
                (scores * m).sum(-1) / filled.clamp_min(1),
                filled / mask.shape[-1],
            ],
            dim=-1,
        )
        return self.classify(torch.cat([pooled, stats], dim=-1).flatten(1))


def abnormal_logit(logits: torch.Tensor) -> torch.Tensor:
    """log P(abnormal) - log P(NILM): the screening decision as one logit."""
    nilm = GRADES.index("NILM")
    others = [i for i in range(logits.shape[-1]) if i != nilm]
    return torch.logsumexp(logits[..., others], dim=-1) - logits[..., nilm]


def slide_score(logits: torch.Tensor) -> torch.Tensor:
    """1 - P(NILM): the probability that the slide is abnormal, the reference's AUC score."""
    return 1 - torch.softmax(logits, dim=-1)[..., GRADES.index("NILM")]


def pooled_embedding(embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(…, 6, K, D) -> (…, D): a slide's mean cell embedding over all its kept cells."""
    m = mask.unsqueeze(-1).to(embeddings.dtype)
    return (embeddings * m).sum((-3, -2)) / m.sum((-3, -2)).clamp_min(1)
