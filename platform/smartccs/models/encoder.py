"""The tile encoder: a timm ViT, created offline, sized by config alone.

The same code builds the CPU demo encoder (a 4-block ViT on 96 px crops, seconds per step on
two cores) and the production one (ViT-L/14, DINOv2-style); which one is a matter of the
``Architecture`` in the job's config and in the model card, never of code. Weights never come
from the network: ``pretrained=False`` always, and trained weights are loaded from the store.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from smartccs.errors import CCSError
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


CLASS_KWARGS = ("mlp_layer", "act_layer")
"""timm kwargs whose value is a class: a card stores it by name (JSON), resolved at build."""


def _resolve_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with the class-valued entries stored by name turned into the classes."""
    from timm import layers

    known = {
        "SwiGLUPacked": layers.SwiGLUPacked,
        "SwiGLU": layers.SwiGLU,
        "GluMlp": layers.GluMlp,
        "Mlp": layers.Mlp,
        "SiLU": torch.nn.SiLU,
        "GELU": torch.nn.GELU,
    }
    out = dict(kwargs)
    for key in CLASS_KWARGS:
        if key in out and isinstance(out[key], str):
            if out[key] not in known:
                raise CCSError(f"{key} {out[key]!r}: unknown; use one of {', '.join(known)}")
            out[key] = known[out[key]]
    return out


def build_from(architecture: Architecture) -> nn.Module:
    """The encoder a config or a model card describes (trained here or imported)."""
    return build_encoder(architecture.timm_name, **_resolve_kwargs(architecture.kwargs))


def input_size(model: nn.Module) -> int:
    """Side in pixels of the square crops the encoder expects (a ViT's positional grid)."""
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if not img_size:
        raise ValueError(f"{type(model).__name__} has no fixed input size (not a ViT?)")
    return int(img_size[0])


def embed_dim(model: nn.Module) -> int:
    """Width of the embedding the encoder returns."""
    return int(model.num_features)


def patch_size(architecture: Architecture) -> int:
    """Side in pixels of the encoder's patches, read without allocating its weights."""
    with torch.device("meta"):
        return int(build_from(architecture).patch_embed.patch_size[0])


def check_window(patch: int, window_px: int | None, h: int, w: int) -> None:
    """Refuses an input off the patch grid, or a window that ``patch_grid`` cannot tile it
    with: at job start, before any tile is read, as well as at every forward pass."""
    if h % patch or w % patch:
        raise ValueError(f"input {h}x{w} px is not a multiple of the {patch} px patch")
    if window_px is None or window_px >= max(h, w):
        return  # the whole input at once
    if window_px % (2 * patch) or window_px > min(h, w):
        raise ValueError(
            f"window of {window_px} px: must be a multiple of twice the {patch} px patch "
            f"and fit the {h}x{w} px input"
        )


def fold_tokens(model: nn.Module, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, D, h/p, w/p): the patch tokens of a ViT's ``forward_features`` on an h x w input,
    prefix tokens dropped, folded back into their grid."""
    patch = int(model.patch_embed.patch_size[0])
    grid = tokens[:, int(model.num_prefix_tokens) :].transpose(1, 2)
    return grid.reshape(len(tokens), -1, h // patch, w // patch)


def patch_grid(model: nn.Module, x: torch.Tensor, window_px: int | None = None) -> torch.Tensor:
    """(B, D, H/p, W/p) patch tokens of a ViT, folded back into their grid.

    With ``window_px`` the image is read in windows of that side overlapping by half, and each
    token is taken from the window it sits most central in. An encoder pretrained on small
    views sees a large tile as it learned to: on a token grid its own size, with at least a
    quarter window of context around every token. (On 256 px tiles a ViT pretrained on 96 px
    views lost its whole lead over random weights, docs/studies/training.md.)"""
    b, _, h, w = x.shape
    patch = int(model.patch_embed.patch_size[0])
    check_window(patch, window_px, h, w)
    if window_px is None or window_px >= max(h, w):
        return fold_tokens(model, model.forward_features(x), h, w)
    n = window_px // patch
    ys, ky, iy = _window_plan(h // patch, n)
    xs, kx, ix = _window_plan(w // patch, n)
    crops = torch.stack([x[:, :, y * patch :, :][:, :, :window_px] for y in ys], 1)
    crops = torch.stack([crops[..., c * patch :][..., :window_px] for c in xs], 2)
    tokens = model.forward_features(crops.flatten(0, 2))[:, int(model.num_prefix_tokens) :]
    tokens = tokens.reshape(b, len(ys), len(xs), n, n, -1)
    grid = tokens[:, ky[:, None], kx[None, :], iy[:, None], ix[None, :]]  # (B, H/p, W/p, D)
    return grid.permute(0, 3, 1, 2)


def _window_plan(cells: int, n: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Along one axis of ``cells`` tokens: window starts (stride ``n / 2``, the last flush with
    the edge) and, per token, the window whose centre is nearest and its index inside it."""
    starts = list(range(0, cells - n + 1, n // 2))
    if starts[-1] != cells - n:
        starts.append(cells - n)
    centres = torch.tensor([s + n / 2 for s in starts])
    pos = torch.arange(cells) + 0.5
    k = (pos[:, None] - centres[None, :]).abs().argmin(dim=1)
    return starts, k, torch.arange(cells) - torch.tensor(starts)[k]


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
