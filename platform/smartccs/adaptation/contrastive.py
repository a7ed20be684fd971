"""The reference adaptation (Smart-CCS) on the slide head, one small step per batch of slides.

The head is the platform's MIL head or an imported MeanMIL (smartccs.models.bag_heads): each
says how it sees a slide (``represent``) and its prototypes (``prototype_views``). A student
copy of the head learns, on the batch's own slides, to tell each slide's cells from
an augmented view of the same cells (flipped and rotated crops, embedded by the same frozen
encoder) against the other slides of the batch and the prototype bank (per grade, the mean
cell embeddings of the most confident training slides: the platform's keeps one per grade, the
reference's ``proto_bank.pth`` up to ``top_w``), while staying consistent with an EMA
teacher. Only reliable slides (a confident teacher) enter the loss, a drift bound resets the
head when it wanders off the source, and the prediction is the mean of student and teacher.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from smartccs.adaptation.config import AdaptConfig
from smartccs.models.bag_heads import BagHead
from smartccs.screening.bags import SlideBag
from smartccs.screening.slides import bag_tensors


def relative_drift(params: dict[str, torch.Tensor], source: dict[str, torch.Tensor]) -> float:
    """‖θ − θ_source‖ / ‖θ_source‖ over floating-point parameters."""
    num = den = 0.0
    params = {k: p.detach() for k, p in params.items()}
    for k, v in source.items():
        if v.is_floating_point() and k in params:
            num += float((params[k].float() - v.float()).pow(2).sum())
            den += float(v.float().pow(2).sum())
    return math.sqrt(num) / max(math.sqrt(den), 1e-12)


def _probs(head: BagHead, emb, scores, mask) -> torch.Tensor:
    return torch.softmax(head(emb, scores, mask).float(), dim=-1)


def adapt_step(
    student: BagHead, teacher: BagHead, bags: Sequence[SlideBag], cfg: AdaptConfig
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
        z = student.represent(*view)
        z_aug = student.represent(*aug)
        logits = z @ z_aug.T / c.temperature  # (B, B): the positive is on the diagonal
        protos = student.prototype_views(view[1], view[2])
        if protos is not None:
            views, grades = protos
            p_logits = z @ views.T / c.temperature
            own = grade[:, None] == grades[None, :]  # a slide's own grade is no negative
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
