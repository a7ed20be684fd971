"""The DINO self-distillation objective, in plain torch.

A student sees every view of a tile (2 global, N local) and is trained to predict, on each,
the teacher's output on the *other* global views. The teacher gets no gradient: it is an
exponential moving average of the student (momentum rising to 1 over training), which makes
it a slowly improving ensemble. Collapse is avoided by centering the teacher's outputs (an EMA
of their batch mean is subtracted) and sharpening them (a low temperature, warmed up from a
softer one). Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", 2021.

DINO's loss reads only the class token, while the detector reads the patch tokens. The optional
iBOT term (Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", 2022) trains
those too: some of the student's global views have patches replaced by a learned mask token,
and at the masked positions the student predicts the teacher's (unmasked) patch distribution
through the same head, centered and sharpened like the class-token targets.
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class DinoConfig(BaseModel):
    """Objective hyper-parameters; schedules are in optimizer steps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    out_dim: int = Field(default=4096, ge=2, description="prototypes (65536 in the paper)")
    hidden_dim: int = Field(default=512, ge=1)
    bottleneck_dim: int = Field(default=128, ge=1)
    head_layers: int = Field(default=3, ge=1)
    student_temp: float = Field(default=0.1, gt=0)
    teacher_temp: float = Field(default=0.04, gt=0)
    warmup_teacher_temp: float = Field(default=0.04, gt=0)
    warmup_teacher_temp_steps: int = Field(default=0, ge=0)
    center_momentum: float = Field(default=0.9, ge=0, le=1, description="1 freezes the center")
    momentum_teacher: float = Field(default=0.996, ge=0, le=1, description="EMA start")
    momentum_teacher_final: float = Field(default=1.0, ge=0, le=1, description="EMA end")
    centering: Literal["ema", "sinkhorn"] = Field(
        default="ema",
        description="how the teacher is kept from collapsing: 'ema' subtracts a running mean "
        "(DINO); 'sinkhorn' balances each batch's assignments over the prototypes (DINOv2), "
        "which still gives every tile its own target when all tiles look alike at the start",
    )
    sinkhorn_iterations: int = Field(default=3, ge=1)
    koleo_weight: float = Field(
        default=0.0,
        ge=0,
        description="weight of DINOv2's KoLeo term on the student's global-view embeddings "
        "(0 = off): spreads embeddings that would otherwise all look alike",
    )


class IbotConfig(BaseModel):
    """iBOT's masked patch prediction on the global views (weight 0: plain DINO)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weight: float = Field(default=0.0, ge=0, description="weight of the patch term; 0 = off")
    mask_ratio: tuple[float, float] = Field(
        default=(0.1, 0.5), description="share of a masked view's patches masked, drawn per view"
    )
    mask_p: float = Field(default=0.5, ge=0, le=1, description="chance a global view is masked")
    teacher_temp: float = Field(default=0.04, gt=0, description="patch targets' temperature")
    center_momentum: float = Field(default=0.9, ge=0, le=1)

    @model_validator(mode="after")
    def _ratio(self) -> IbotConfig:
        lo, hi = self.mask_ratio
        if not 0 <= lo <= hi < 1:
            raise ValueError(f"mask_ratio must satisfy 0 <= low <= high < 1, got {self.mask_ratio}")
        return self

    @property
    def enabled(self) -> bool:
        return self.weight > 0


class DINOHead(nn.Module):
    """MLP, L2-normalized bottleneck, then a weight-normalized linear layer onto prototypes.

    The last layer's norm is fixed at 1 (weight_norm with a frozen gain), as in DINO: only the
    prototype directions are learned, which keeps training stable.
    """

    def __init__(self, in_dim: int, cfg: DinoConfig):
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(cfg.head_layers - 1):
            layers += [nn.Linear(dim, cfg.hidden_dim), nn.GELU()]
            dim = cfg.hidden_dim
        layers.append(nn.Linear(dim, cfg.bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(cfg.bottleneck_dim, cfg.out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        gain.data.fill_(1.0)
        gain.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class MultiCropNet(nn.Module):
    """Backbone + head over a list of views; views of one size go through the backbone at once.

    With ``mask_token`` (iBOT), the net owns a learned token that replaces masked patch
    embeddings; it is not part of the backbone, so the saved encoder is the plain ViT.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, mask_token: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.mask_token: nn.Parameter | None = None
        if mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, int(backbone.num_features)))
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    global_features: torch.Tensor | None = None
    """Backbone embeddings of the first group of views (the global crops) of the last call."""
    patch_outputs: list[torch.Tensor] | None = None
    """Head outputs (B, N, out_dim) on the patch tokens of each global view, when asked for."""

    def tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The ViT's output tokens (B, prefix + N, C); ``mask`` (B, N) patches get the mask token.

        The same steps as timm's ``VisionTransformer.forward_features``, with the mask applied
        to the patch embeddings before the position embedding is added.
        """
        bb = self.backbone
        x = bb.patch_embed(x)
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("masked views need a net built with mask_token=True")
            m = mask.reshape(*x.shape[:-1], 1)
            x = torch.where(m, self.mask_token.to(x.dtype), x)
        x = bb._pos_embed(x)
        x = bb.patch_drop(x)
        x = bb.norm_pre(x)
        x = bb.blocks(x)
        return bb.norm(x)

    def forward(
        self,
        views: list[torch.Tensor],
        masks: list[torch.Tensor | None] | None = None,
        patches: bool = False,
    ) -> list[torch.Tensor]:
        """Head outputs per view. ``masks`` (one per global view) and ``patches`` make the
        global views also yield their patch tokens' head outputs, in ``patch_outputs``."""
        outputs: list[torch.Tensor] = []
        self.patch_outputs = None
        start = 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape[-1] == views[start].shape[-1]:
                end += 1
            x = torch.cat(views[start:end])
            if start == 0 and (patches or masks is not None):
                n = end - start
                mask = None
                if masks is not None and any(m is not None for m in masks):
                    grid = [v.shape[-2] // self.patch_size * (v.shape[-1] // self.patch_size)
                            for v in views[start:end]]  # fmt: skip
                    mask = torch.cat(
                        [
                            m if m is not None else torch.zeros(len(v), g, dtype=torch.bool)
                            for m, v, g in zip(masks, views[start:end], grid, strict=True)
                        ]
                    ).to(x.device)
                tokens = self.tokens(x, mask)
                feats = self.backbone.forward_head(tokens)
                prefix = self.backbone.num_prefix_tokens
                self.patch_outputs = list(self.head(tokens[:, prefix:]).chunk(n))
            else:
                feats = self.backbone(x)
            if start == 0:
                self.global_features = feats
            outputs += list(self.head(feats).chunk(end - start))
            start = end
        return outputs

    @property
    def patch_size(self) -> int:
        return int(self.backbone.patch_embed.patch_size[0])


def patch_masks(n: int, grid: int, cfg: IbotConfig, g: torch.Generator) -> torch.Tensor | None:
    """(n, grid) boolean masks for one global view's batch: each image is masked with chance
    ``mask_p``, then a share drawn from ``mask_ratio`` of its patches, chosen at random."""
    masks = torch.zeros(n, grid, dtype=torch.bool)
    lo, hi = cfg.mask_ratio
    for i in range(n):
        if not bool(torch.rand(1, generator=g) < cfg.mask_p):
            continue
        ratio = lo + (hi - lo) * float(torch.rand(1, generator=g))
        k = max(1, round(ratio * grid))
        masks[i, torch.randperm(grid, generator=g)[:k]] = True
    return masks if masks.any() else None


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of the student, to be moved only by :func:`ema_update`."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad = False
    return teacher


@torch.no_grad()
def ema_update(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    for ps, pt in zip(student.parameters(), teacher.parameters(), strict=True):
        pt.mul_(momentum).add_(ps.detach(), alpha=1 - momentum)


def teacher_momentum(step: int, total_steps: int, cfg: DinoConfig) -> float:
    """Cosine schedule from ``momentum_teacher`` to ``momentum_teacher_final``."""
    frac = min(1.0, step / max(1, total_steps))
    base, final = cfg.momentum_teacher, cfg.momentum_teacher_final
    return final - (final - base) * (math.cos(math.pi * frac) + 1) / 2


def teacher_temperature(step: int, cfg: DinoConfig) -> float:
    """Linear warm-up from a softer teacher: a sharp teacher early on can collapse training."""
    if step >= cfg.warmup_teacher_temp_steps:
        return cfg.teacher_temp
    frac = step / cfg.warmup_teacher_temp_steps
    return cfg.warmup_teacher_temp + frac * (cfg.teacher_temp - cfg.warmup_teacher_temp)


class DINOLoss(nn.Module):
    """Cross-entropy between the centered, sharpened teacher and the student, across views."""

    def __init__(self, cfg: DinoConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))

    def forward(
        self, student_out: list[torch.Tensor], teacher_out: list[torch.Tensor], step: int
    ) -> torch.Tensor:
        """Mean over (teacher global view, different student view) pairs; updates the center."""
        temp = teacher_temperature(step, self.cfg)
        if self.cfg.centering == "sinkhorn":
            balanced = sinkhorn_knopp(torch.cat(teacher_out).float(), temp, self.cfg)
            targets = list(balanced.chunk(len(teacher_out)))
        else:
            targets = [F.softmax((t - self.center) / temp, dim=-1).detach() for t in teacher_out]
        logps = [F.log_softmax(s / self.cfg.student_temp, dim=-1) for s in student_out]
        total, pairs = student_out[0].new_zeros(()), 0
        for ti, target in enumerate(targets):
            for si, logp in enumerate(logps):
                if si == ti:  # the same view: nothing to predict
                    continue
                total = total + torch.sum(-target * logp, dim=-1).mean()
                pairs += 1
        self.update_center(torch.cat(teacher_out))
        return total / pairs

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """EMA of the teacher's mean output, averaged over all workers."""
        total = teacher_out.sum(dim=0, keepdim=True)
        count = torch.tensor([teacher_out.shape[0]], dtype=total.dtype, device=total.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
            dist.all_reduce(count)
        m = self.cfg.center_momentum
        self.center.mul_(m).add_(total / count, alpha=1 - m)


class IBOTPatchLoss(nn.Module):
    """Cross-entropy between teacher and student patch distributions at masked positions.

    Per view, the teacher's patch outputs (unmasked view) are centered with their own EMA
    center and sharpened; the student's are read at the positions its view had masked. The
    loss of an image is the mean over its masked patches; images without a mask count 0, and
    the result is the mean over the images of the global views (as in iBOT).
    """

    def __init__(self, cfg: IbotConfig, out_dim: int, student_temp: float):
        super().__init__()
        self.cfg, self.student_temp = cfg, student_temp
        self.register_buffer("center", torch.zeros(1, 1, out_dim))

    def forward(
        self,
        student_patches: list[torch.Tensor],
        teacher_patches: list[torch.Tensor],
        masks: list[torch.Tensor | None],
    ) -> torch.Tensor:
        total, images = student_patches[0].new_zeros(()), 0
        for s, t, m in zip(student_patches, teacher_patches, masks, strict=True):
            images += len(s)
            if m is None:
                continue
            m = m.to(s.device, torch.float32)
            target = F.softmax((t.float() - self.center) / self.cfg.teacher_temp, dim=-1).detach()
            ce = torch.sum(-target * F.log_softmax(s.float() / self.student_temp, dim=-1), dim=-1)
            total = total + (torch.sum(ce * m, dim=-1) / m.sum(dim=-1).clamp(min=1.0)).sum()
        self.update_center(torch.cat(teacher_patches))
        return total / max(1, images)

    @torch.no_grad()
    def update_center(self, teacher_patches: torch.Tensor) -> None:
        """EMA of the teacher's mean patch output, averaged over all workers."""
        flat = teacher_patches.float().reshape(-1, teacher_patches.shape[-1])
        total = flat.sum(dim=0).view(1, 1, -1)
        count = torch.tensor([flat.shape[0]], dtype=total.dtype, device=total.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
            dist.all_reduce(count)
        m = self.cfg.center_momentum
        self.center.mul_(m).add_(total / count, alpha=1 - m)


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, cfg: DinoConfig) -> torch.Tensor:
    """Teacher targets (B, K) whose prototype marginals over the global batch are uniform.

    Alternately rescales the prototype rows and the sample columns of exp(logits / temp), so
    that each prototype gets an equal share of the batch and each sample a distribution of its
    own; in the log domain, so a low temperature cannot overflow. Sums run over all workers.
    """
    distributed = dist.is_available() and dist.is_initialized()
    q = (logits / temp).double()
    q = torch.exp(q - q.max()).t()  # (K, B)
    n_samples = torch.tensor([q.shape[1]], dtype=q.dtype, device=q.device)
    total = q.sum()
    if distributed:
        dist.all_reduce(n_samples)
        dist.all_reduce(total)
    q = q / total
    n_protos = q.shape[0]
    for _ in range(cfg.sinkhorn_iterations):
        rows = q.sum(dim=1, keepdim=True)
        if distributed:
            dist.all_reduce(rows)
        q = q / (rows.clamp_min(1e-30) * n_protos)
        q = q / (q.sum(dim=0, keepdim=True).clamp_min(1e-30) * n_samples)
    return (q * n_samples).t().to(logits.dtype)


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy term (DINOv2): -mean log distance to the nearest neighbour.

    On L2-normalised embeddings of one batch; it falls as embeddings spread over the sphere,
    the opposite of the collapse in which every tile maps to the same point.
    """
    x = F.normalize(features.float(), dim=-1)
    d = torch.cdist(x, x)
    d = d + torch.diag(torch.full((len(x),), float("inf"), device=x.device))
    return -torch.log(d.min(dim=1).values + eps).mean()
