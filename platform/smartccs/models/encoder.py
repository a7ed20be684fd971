"""The tile encoder: a timm ViT, created offline, sized by config alone.

The same code builds the CPU demo encoder (a 4-block ViT on 96 px crops, seconds per step on
two cores) and the production one (ViT-L/14, DINOv2-style); which one is a matter of the
``Architecture`` in the job's config and in the model card, never of code. Weights never come
from the network: ``pretrained=False`` always, and trained weights are loaded from the store.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from smartccs.models.artifacts import Architecture

DEMO_ENCODER = Architecture(
    timm_name="vit_tiny_patch16_224",
    kwargs={
        "img_size": 96,
        "patch_size": 16,
        "embed_dim": 96,
        "depth": 4,
        "num_heads": 3,
        "dynamic_img_size": True,
    },
)
"""Small enough to pretrain for a few steps on a 2-core CPU in the tests and the demo."""

PRODUCTION_ENCODER = Architecture(
    timm_name="vit_large_patch14_dinov2",
    kwargs={"img_size": 224, "dynamic_img_size": True},
)
"""ViT-L/14 (304M parameters) at 224 px crops, the class of encoder the reference pretrains."""


def build_encoder(arch: str, **kwargs: Any) -> nn.Module:
    """A headless timm model (``num_classes=0``: forward returns the pooled embedding)."""
    import timm

    if kwargs.get("pretrained"):
        raise ValueError("encoders are never downloaded: pretrained weights come from the store")
    kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained", "num_classes")}
    return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)


def build_from(architecture: Architecture) -> nn.Module:
    """The encoder a config or a model card describes."""
    return build_encoder(architecture.timm_name, **architecture.kwargs)


def input_size(model: nn.Module) -> int:
    """Side in pixels of the square crops the encoder expects (a ViT's positional grid)."""
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if not img_size:
        raise ValueError(f"{type(model).__name__} has no fixed input size (not a ViT?)")
    return int(img_size[0])


def embed_dim(model: nn.Module) -> int:
    """Width of the embedding the encoder returns."""
    return int(model.num_features)


def _layer_index(param_name: str, depth: int) -> int:
    """0 for the patch and position embeddings and prefix tokens, ``i + 1`` for block ``i``,
    ``depth + 1`` for the rest (the final norms), as in BEiT's and DINOv2's finetuning recipes."""
    if param_name.startswith("blocks."):
        return int(param_name.split(".")[1]) + 1
    if param_name.startswith(("patch_embed", "pos_embed", "cls_token", "reg_token", "mask_token")):
        return 0
    return depth + 1


def layer_lr_scales(model: nn.Module, decay: float) -> list[tuple[float, list[nn.Parameter]]]:
    """Parameters grouped by lr scale ``decay ** (depth + 1 - layer)``, in the model's order:
    the top of a pretrained encoder adapts to the new task while its lower layers, the most
    generic, move least. Layers of equal scale share a group, so ``decay == 1`` is one group,
    the layout of optimizer states saved before layer decay existed."""
    depth = len(getattr(model, "blocks", ()))
    groups: dict[float, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        groups.setdefault(decay ** (depth + 1 - _layer_index(name, depth)), []).append(p)
    return sorted(groups.items())
