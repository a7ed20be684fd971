"""The Smart-CCS reference's abnormal-cell detector (Det-cell) on transformers' Deformable DETR.

The reference trains Deformable DETR (torchvision ResNet-50 with frozen BatchNorm, layers 2-4
plus one stride-2 level = 4 feature levels, sine position encoding, 256-d, 8 heads, 6 + 6
layers, FFN 1024, 4 sampling points, 300 queries, single-stage, no box refinement) for the 6
abnormal classes. Its weights run here on ``DeformableDetrForObjectDetection`` (pure-PyTorch
multi-scale deformable attention on CPU, its own kernels elsewhere), built with random
weights and no download, then filled by smartccs.models.detr_keys. transformers is imported
only when a network is built: ``import smartccs.models`` stays torch-free.

Inference follows the reference's ``extract.py``: tiles resized to 800 px on the short side
(long side at most 1332), ImageNet mean/std; per query the best class's sigmoid score, kept
above 0.2, then NMS at IoU 0.75; (cx, cy, w, h) relative to the tile -> level-0 xyxy pixels.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from smartccs.models.artifacts import Normalization
from smartccs.models.detector import normalize
from smartccs.taxonomy import ABNORMAL_CLASSES


class DetrShape(BaseModel):
    """The network's hyper-parameters: what the card needs to rebuild it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: str = Field(default="resnet50", description="timm name, torchvision key names")
    d_model: int = 256
    encoder_layers: int = 6
    decoder_layers: int = Field(default=6, ge=2, description="transformers ties heads: 2+")
    heads: int = 8
    ffn_dim: int = 1024
    num_queries: int = 300
    num_feature_levels: int = 4
    n_points: int = 4
    num_labels: int = len(ABNORMAL_CLASSES)


REFERENCE_SHAPE = DetrShape()


class DetectorSpec(BaseModel):
    """How tiles go in and detections come out, as the reference's inference does."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    classes: tuple[str, ...] = ABNORMAL_CLASSES
    short_side: int = 800
    max_size: int = Field(default=1332, description="the reference's val_trans cap")
    normalization: Normalization = Field(
        default=Normalization(), description="ImageNet's, as the reference's transforms"
    )
    score_threshold: float = Field(default=0.2, description="kept if score > this (det_thre)")
    nms_iou: float = Field(default=0.75, description="get_pseudo_labels' NMS threshold")


class TileRegion(BaseModel):
    """Where a tile lies on the slide, in level-0 pixels."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    x0: float
    y0: float
    w0: float = Field(gt=0)
    h0: float = Field(gt=0)


class TileDetections(BaseModel):
    """One tile's detections: level-0 xyxy boxes, class names, scores; best first."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    boxes: list[tuple[float, float, float, float]] = Field(default_factory=list)
    labels: list[str] = Field(default_factory=list)
    scores: list[float] = Field(default_factory=list)


def hf_config(shape: DetrShape) -> Any:
    """transformers' ``DeformableDetrConfig`` for ``shape``: timm backbone, no weights fetched."""
    from transformers import DeformableDetrConfig

    return DeformableDetrConfig(
        use_timm_backbone=True,
        backbone=shape.backbone,
        use_pretrained_backbone=False,
        dilation=False,
        position_embedding_type="sine",
        d_model=shape.d_model,
        encoder_layers=shape.encoder_layers,
        decoder_layers=shape.decoder_layers,
        encoder_attention_heads=shape.heads,
        decoder_attention_heads=shape.heads,
        encoder_ffn_dim=shape.ffn_dim,
        decoder_ffn_dim=shape.ffn_dim,
        num_queries=shape.num_queries,
        num_feature_levels=shape.num_feature_levels,
        encoder_n_points=shape.n_points,
        decoder_n_points=shape.n_points,
        two_stage=False,
        with_box_refine=False,
        activation_function="relu",
        num_labels=shape.num_labels,
    )


def build_network(shape: DetrShape) -> nn.Module:
    """A randomly initialised ``DeformableDetrForObjectDetection`` (works under ``meta``)."""
    from transformers import DeformableDetrForObjectDetection

    return DeformableDetrForObjectDetection(hf_config(shape))


def target_shapes(shape: DetrShape) -> dict[str, torch.Size]:
    """The network's tensor names and shapes, without allocating its weights."""
    with torch.device("meta"):
        return {k: v.shape for k, v in build_network(shape).state_dict().items()}


def resized_size(height: int, width: int, spec: DetectorSpec) -> tuple[int, int]:
    """(h, w) after torchvision's ``Resize(short_side, max_size=...)``, as the reference."""
    short, long = min(height, width), max(height, width)
    new_short, new_long = spec.short_side, int(spec.short_side * long / short)
    if new_long > spec.max_size:
        new_short, new_long = int(spec.max_size * new_short / new_long), spec.max_size
    return (new_short, new_long) if height <= width else (new_long, new_short)


def preprocess(tiles: torch.Tensor, spec: DetectorSpec) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> resized (bilinear, antialiased) and normalised."""
    h, w = resized_size(tiles.shape[-2], tiles.shape[-1], spec)
    x = tiles.float()
    if (h, w) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return normalize(x, spec.normalization)


def to_level0(boxes: torch.Tensor, region: TileRegion) -> torch.Tensor:
    """(N, 4) (cx, cy, w, h) relative to the tile -> (N, 4) level-0 xyxy pixels. Relative
    boxes survive the aspect-keeping resize unchanged, so the tile's level-0 size scales them."""
    cx, cy, w, h = boxes.unbind(-1)
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
    scale = xyxy.new_tensor([region.w0, region.h0, region.w0, region.h0])
    return xyxy * scale + xyxy.new_tensor([region.x0, region.y0, region.x0, region.y0])


def decode(
    logits: torch.Tensor, boxes: torch.Tensor, region: TileRegion, spec: DetectorSpec
) -> TileDetections:
    """One tile's (Q, C) logits and (Q, 4) boxes -> its detections, by the reference's rule:
    best class per query, score > threshold, class-agnostic NMS."""
    from torchvision.ops import nms

    scores, labels = logits.sigmoid().max(dim=-1)
    keep = scores > spec.score_threshold
    scores, labels, xyxy = scores[keep], labels[keep], to_level0(boxes[keep], region)
    kept = nms(xyxy.double(), scores.double(), spec.nms_iou)  # IoU is scale-free
    return TileDetections(
        boxes=[tuple(b) for b in xyxy[kept].tolist()],
        labels=[spec.classes[i] for i in labels[kept].tolist()],
        scores=scores[kept].tolist(),
    )


class CellDetector(nn.Module):
    """The imported network with its spec; ``detect`` maps tiles to level-0 detections."""

    def __init__(self, network: nn.Module, spec: DetectorSpec, card: Any = None):
        super().__init__()
        self.network = network
        self.spec = spec
        self.card = card

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed pixels -> last decoder layer's (B, Q, C) logits, (B, Q, 4) boxes."""
        out = self.network(pixel_values=pixels)
        return out.logits, out.pred_boxes

    @torch.no_grad()
    def detect(
        self,
        tiles: torch.Tensor,
        regions: list[TileRegion] | list[tuple[float, float, float, float]],
    ) -> list[TileDetections]:
        """(B, 3, H, W) RGB tiles in [0, 1] and their level-0 regions -> detections."""
        if tiles.ndim != 4 or tiles.shape[1] != 3 or len(regions) != tiles.shape[0]:
            raise ValueError(
                f"expected (B, 3, H, W) tiles and B regions; got {tuple(tiles.shape)} and "
                f"{len(regions)}"
            )
        where = [as_region(r) for r in regions]
        logits, boxes = self(preprocess(tiles, self.spec))
        return [
            decode(lo, bo, r, self.spec) for lo, bo, r in zip(logits, boxes, where, strict=True)
        ]


def as_region(region: TileRegion | tuple[float, float, float, float]) -> TileRegion:
    """A region given as a model or as an (x0, y0, w0, h0) tuple."""
    if isinstance(region, TileRegion):
        return region
    x0, y0, w0, h0 = region
    return TileRegion(x0=x0, y0=y0, w0=w0, h0=h0)
