"""The reference adaptation (Smart-CCS) on the MIL head, one small step per batch of slides.

A student copy of the head learns, on the batch's own slides, to tell each slide's cells from
an augmented view of the same cells (flipped and rotated crops, embedded by the same frozen
encoder) against the other slides of the batch and the prototype bank (per grade, the mean
cell embedding of the most confident training slides), while staying consistent with an EMA
teacher. Only reliable slides (a confident teacher) enter the loss, a drift bound resets the
head when it wanders off the source, and the prediction is the mean of student and teacher.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from smartccs.adaptation.config import AdaptConfig
from smartccs.models.mil import MILHead
from smartccs.screening.bags import SlideBag
from smartccs.screening.slides import bag_tensors


def _represent(head: MILHead, emb: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor):
    """(B, 6·h) unit vectors: the head's pooled cell tokens per class, the slide as it sees it."""
    return F.normalize(head.pool(emb, scores, mask).flatten(1), dim=-1)


def _prototypes(head: MILHead, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """(7, 6·h) the prototype bank seen through the head, or None when the bank is empty."""
    bank = head.prototypes
    if not bool(bank.abs().sum() > 0):
        return None
    m = mask.to(scores.dtype)
    typical = (scores * m).sum() / m.sum().clamp_min(1)  # a kept cell's usual score
    tokens = head.token(torch.cat([bank, typical.expand(len(bank), 1)], dim=-1))
    per_class = tokens[:, None, :] + head.class_embed[None]  # (7, 6, h)
    return F.normalize(per_class.flatten(1), dim=-1)


def relative_drift(params: dict[str, torch.Tensor], source: dict[str, torch.Tensor]) -> float:
    """‖θ − θ_source‖ / ‖θ_source‖ over floating-point parameters."""
    num = den = 0.0
    params = {k: p.detach() for k, p in params.items()}
    for k, v in source.items():
        if v.is_floating_point() and k in params:
            num += float((params[k].float() - v.float()).pow(2).sum())
            den += float(v.float().pow(2).sum())
    return math.sqrt(num) / max(math.sqrt(den), 1e-12)


def _probs(head: MILHead, emb, scores, mask) -> torch.Tensor:
    return torch.softmax(head(emb, scores, mask).float(), dim=-1)


def adapt_step(
    student: MILHead, teacher: MILHead, bags: Sequence[SlideBag], cfg: AdaptConfig
) -> dict[str, float]:
    """One batch of adaptation on the student, then the teacher's EMA; returns loss terms."""
    c = cfg.smartccs
    usable = [b for b in bags if b.ok and b.mask.any()]
    if not usable:
        return {"reliable": 0.0, "loss": float("nan")}
    view = bag_tensors(usable)
    aug = bag_tensors(usable, augmented=True)
    student.eval(), teacher.eval()  # no dropout: the step follows the data, not noise
    with torch.no_grad():
        t_probs = _probs(teacher, *view)
    confidence, grade = t_probs.max(-1)
    reliable = confidence >= c.min_confidence
    stats = {"reliable": float(reliable.sum()), "slides": float(len(usable))}
    if not bool(reliable.any()):
        return stats | {"loss": float("nan")}
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=c.lr)
    for _ in range(c.steps):
        z = _represent(student, *view)
        z_aug = _represent(student, *aug)
        logits = z @ z_aug.T / c.temperature  # (B, B): the positive is on the diagonal
        protos = _prototypes(student, view[1], view[2])
        if protos is not None:
            p_logits = z @ protos.T / c.temperature
            own = F.one_hot(grade, len(protos)).bool()  # a slide's own grade is no negative
            logits = torch.cat([logits, p_logits.masked_fill(own, float("-inf"))], dim=1)
        target = torch.arange(len(usable))
        nce = F.cross_entropy(logits[reliable], target[reliable])
        s_log = F.log_softmax(student(*aug).float(), dim=-1)
        kl = F.kl_div(s_log[reliable], t_probs[reliable], reduction="batchmean")
        loss = nce + c.consistency * kl
        if not bool(torch.isfinite(loss.detach())):
            return stats | {"loss": float("nan")}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        for ps, pt in zip(student.parameters(), teacher.parameters(), strict=True):
            pt.mul_(c.momentum).add_(ps.detach(), alpha=1 - c.momentum)
    return stats | {"loss": loss.item(), "nce": nce.item(), "kl": kl.item()}
