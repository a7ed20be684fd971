"""The abnormal-cell detector: the tile encoder's ViT with a dense, anchor-free detection head.

The ViT's patch tokens, folded back into their grid and upsampled to stride ``patch / 2``,
feed two small convolutional heads: per location a score for each class (sigmoid, focal loss)
and the distances from that location to the four sides of the cell's box (GIoU loss), as in
FCOS. Inference keeps locations above a score floor, decodes their boxes and runs per-class
NMS. The reference pipeline uses a DETR-style set predictor; a dense head was chosen because
set prediction with Hungarian matching needs hundreds of epochs to converge, which no CPU demo
and few re-trainings on a new center can afford, while the outputs (boxes, classes, scores in
level-0 pixels) are the same. See docs/training.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torchvision.ops import batched_nms

from smartccs.models.artifacts import ModelCard, Normalization
from smartccs.models.encoder import build_from, patch_grid
from smartccs.models.materialize import with_weights
from smartccs.taxonomy import ABNORMAL_CLASSES

NORMAL_SQUAMOUS = "squamous"
"""The detector's seventh class: normal squamous cells, counted for specimen adequacy."""

DETECTION_CLASSES: tuple[str, ...] = (*ABNORMAL_CLASSES, NORMAL_SQUAMOUS)
"""Output order of the detector's class scores: the six Bethesda classes, then normal squamous."""

SQUAMOUS_KINDS = frozenset({"superficial", "intermediate", "parabasal"})
"""Annotation classes that count as normal squamous cells; others (inflammatory, debris) are
background to the detector."""


def detection_class(annotation_class: str) -> int | None:
    """Index in DETECTION_CLASSES of an annotated cell, None for what the detector ignores."""
    if annotation_class in ABNORMAL_CLASSES:
        return ABNORMAL_CLASSES.index(annotation_class)
    if annotation_class in SQUAMOUS_KINDS:
        return len(ABNORMAL_CLASSES)
    return None


class HeadConfig(BaseModel):
    """Sizes of the detection head and the inference cuts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    width: int = Field(default=96, ge=8, description="channels of the head's convolutions")
    score_floor: float = Field(default=0.05, gt=0, lt=1, description="drop scores below")
    nms_iou: float = Field(default=0.5, gt=0, le=1)
    max_per_tile: int = Field(default=100, ge=1)
    window_px: int | None = Field(
        default=None,
        ge=16,
        description="read the backbone on windows of this side overlapping by half, each "
        "token from the window it is most central in (None: the whole tile at once). Set it "
        "to the encoder's pretraining view size: on larger token grids than it learned on, "
        "its features fall back to a random encoder's",
    )


class Detections(BaseModel):
    """One tile's detections, in the tile's input pixels."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    boxes: torch.Tensor  # (N, 4) xyxy
    scores: torch.Tensor  # (N,)
    labels: torch.Tensor  # (N,) index into DETECTION_CLASSES


class CellDetector(nn.Module):
    """ViT backbone -> stride patch/2 feature map -> class scores and box distances."""

    def __init__(self, backbone: nn.Module, cfg: HeadConfig, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        self.num_classes = num_classes
        self.patch = int(backbone.patch_embed.patch_size[0])
        self.stride = self.patch // 2
        dim, w = int(backbone.num_features), cfg.width
        self.neck = nn.Sequential(
            nn.Conv2d(dim, w, 1),
            nn.ConvTranspose2d(w, w, 2, stride=2),
            nn.GroupNorm(8 if w % 8 == 0 else 1, w),
            nn.GELU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.GroupNorm(8 if w % 8 == 0 else 1, w),
            nn.GELU(),
        )
        self.cls_head = nn.Conv2d(w, num_classes, 3, padding=1)
        self.box_head = nn.Conv2d(w, 4, 3, padding=1)
        prior = 0.01  # start every location near "no cell" so the focal loss starts calm
        nn.init.constant_(self.cls_head.bias, -math.log((1 - prior) / prior))
        nn.init.zeros_(self.box_head.weight)
        nn.init.zeros_(self.box_head.bias)

    def features(self, x: torch.Tensor, backbone_grad: bool = True) -> torch.Tensor:
        with torch.set_grad_enabled(backbone_grad and torch.is_grad_enabled()):
            tokens = patch_grid(self.backbone, x, self.cfg.window_px)
        return self.neck(tokens)

    def forward(
        self, x: torch.Tensor, backbone_grad: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits (B, C, H, W) and box side distances in pixels (B, 4, H, W).

        ``backbone_grad=False`` holds the backbone fixed for this pass: no graph is kept for it,
        so a frozen-backbone step costs its forward only.
        """
        f = self.features(x, backbone_grad)
        distances = F.softplus(self.box_head(f) + 1.0) * self.stride * 2
        return self.cls_head(f), distances

    def centers(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """(H*W, 2) pixel centres of the feature map's locations."""
        ys, xs = torch.meshgrid(
            torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
        )
        return (torch.stack([xs, ys], -1).reshape(-1, 2).float() + 0.5) * self.stride

    @torch.no_grad()
    def detect(self, x: torch.Tensor) -> list[Detections]:
        """Boxes, scores and classes per image after the score floor and per-class NMS."""
        logits, dist = self(x)
        logits, dist = logits.float(), dist.float()  # boxes and NMS in fp32, even under autocast
        b, c, h, w = logits.shape
        centers = self.centers(h, w, x.device)
        scores = logits.sigmoid().permute(0, 2, 3, 1).reshape(b, -1, c)
        dist = dist.permute(0, 2, 3, 1).reshape(b, -1, 4)
        boxes = decode(centers, dist).clamp_(min=0, max=float(max(x.shape[-2:])))
        out = []
        for i in range(b):
            loc, cls = torch.nonzero(scores[i] > self.cfg.score_floor, as_tuple=True)
            s = scores[i, loc, cls]
            keep = batched_nms(boxes[i, loc], s, cls, self.cfg.nms_iou)[: self.cfg.max_per_tile]
            out.append(Detections(boxes=boxes[i, loc[keep]], scores=s[keep], labels=cls[keep]))
        return out


def decode(centers: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """(…, 4) left/top/right/bottom distances around (…, 2) centres -> xyxy boxes."""
    return torch.cat([centers - distances[..., :2], centers + distances[..., 2:]], dim=-1)


def preprocess(
    images: np.ndarray | torch.Tensor, input_px: int, normalization: Normalization
) -> torch.Tensor:
    """uint8 tiles (B, H, W, 3) -> normalized float (B, 3, input_px, input_px)."""
    return normalize(resize_tiles(images, input_px), normalization)


def resize_tiles(images: np.ndarray | torch.Tensor, input_px: int) -> torch.Tensor:
    """uint8 tiles (B, H, W, 3) -> [0, 1] float (B, 3, input_px, input_px)."""
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = images.copy()  # Ray Data hands out read-only views; torch wants to own them
    x = torch.as_tensor(images).permute(0, 3, 1, 2).to(torch.float32) / 255
    if x.shape[-1] != input_px or x.shape[-2] != input_px:
        x = F.interpolate(x, size=(input_px, input_px), mode="bilinear", antialias=True)
    return x.clamp_(0, 1)


def normalize(x: torch.Tensor, normalization: Normalization) -> torch.Tensor:
    mean = torch.tensor(normalization.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(normalization.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def build_detector(
    card: ModelCard, state: Mapping[str, torch.Tensor] | None = None
) -> CellDetector:
    """The detector a card describes: holding ``state`` (strict; built without random weights
    first, ``models.materialize``), or with untrained weights when there is none."""
    head = HeadConfig.model_validate(card.head.get("config", {}))

    def build() -> CellDetector:
        return CellDetector(build_from(card.architecture), head, len(card.classes))

    return build() if state is None else with_weights(build, state)


def input_px_of(card: ModelCard) -> int:
    return int(card.head["input_px"])
