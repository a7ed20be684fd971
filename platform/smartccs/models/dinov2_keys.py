"""Published encoder checkpoints -> timm state dicts, strictly.

Every tensor of the source is either consumed or dropped by name as a training-only part (the
DINO/iBOT heads of a teacher checkpoint, DINOv2's ``mask_token``), and every tensor of the timm
network is filled, with its exact shape. Anything else is refused naming the key, so a file of
another architecture or a truncated export never turns into a half-random encoder.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

from smartccs.models.state_fill import KeyMapError, StateFill, tensors_of
from smartccs.models.zoo import Layout

TEACHER_HEADS = ("dino_head.", "ibot_head.")
"""Prefixes of the teacher's projection heads: used in pretraining only, dropped."""

TRAINING_ONLY = ("mask_token",)
"""DINOv2 backbone tensors used only for iBOT masking in pretraining, dropped."""

INTERPOLATE_OFFSET = 0.1
"""DINOv2's position-grid resampling adds this to the target grid before dividing (a
``scale_factor``, not a size), bicubic without antialiasing; copied so that the resampled
grid equals the one Meta's model computes at run time for the same input."""

_CHUNKED = re.compile(r"blocks\.(\d+)\.(\d+)\.(.+)")
_PLAIN = re.compile(r"blocks\.(\d+)\.(.+)")
_RENAMES = (("register_tokens", "reg_token"), (".mlp.w12.", ".mlp.fc1."), (".mlp.w3.", ".mlp.fc2."))
"""DINOv2 -> timm names: register tokens, and the packed SwiGLU FFN of the ViT-g models."""


class Conversion(BaseModel):
    """What a conversion did, for the model card."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layout: Layout
    tensors: int
    dropped: list[str]
    pos_embed_resampled: str | None = None


def backbone_tensors(raw: Any, layout: Layout) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The backbone's tensors under their layout's own names, and the keys dropped as heads."""
    if layout == "dinov2-teacher-chunked":
        if not isinstance(raw, Mapping) or "teacher" not in raw:
            found = ", ".join(sorted(map(str, raw))[:6]) if isinstance(raw, Mapping) else ""
            raise KeyMapError(
                f"no 'teacher' entry (a DINOv2 training checkpoint has one); found: {found or '-'}"
            )
        raw, kept, dropped = raw["teacher"], {}, []
        for key, value in tensors_of(raw, "teacher").items():
            if key.startswith("backbone."):
                kept[key.removeprefix("backbone.")] = value
            elif key.startswith(TEACHER_HEADS):
                dropped.append(key)
            else:
                raise KeyMapError(f"unexpected key teacher[{key!r}] (not backbone. nor a head)")
        return kept, dropped
    return tensors_of(raw, "checkpoint"), []


def chunk_size(keys: Iterable[str]) -> int:
    """Blocks per FSDP chunk of a chunked checkpoint: where chunk 1 starts (DINOv2 keeps the
    global block index inside each chunk, padding the chunk's front with parameterless
    Identity modules), or all of them when there is one chunk."""
    starts: dict[int, int] = {}
    for key in keys:
        if m := _CHUNKED.fullmatch(key):
            starts[int(m[1])] = min(starts.get(int(m[1]), 1 << 30), int(m[2]))
    return starts.get(1) or 1 << 30


def timm_name(key: str, layout: Layout, size: int = 1 << 30) -> str:
    """The timm name of a key of ``layout``; refuses a block key outside its chunk (``size``
    blocks per chunk)."""
    if layout == "timm":
        return key
    if key.startswith("blocks."):
        if layout == "dinov2-teacher-chunked":
            m = _CHUNKED.fullmatch(key)
            if not m or int(m[1]) != int(m[2]) // size:
                raise KeyMapError(f"unexpected key {key!r}: not blocks.<chunk>.<i> in chunk")
            key = f"blocks.{m[2]}.{m[3]}"
        elif not _PLAIN.fullmatch(key) or not key.split(".")[1].isdigit():
            raise KeyMapError(f"unexpected key {key!r}: not blocks.<i>.")
    for old, new in _RENAMES:
        key = key.replace(old, new)
    return key


def resample_grid(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + M*M, D) -> (1, 1 + grid*grid, D) by DINOv2's own run-time rule."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:].float()
    m = math.isqrt(patches.shape[1])
    if m * m != patches.shape[1]:
        raise KeyMapError(f"pos_embed of {patches.shape[1]} patch tokens is not a square grid")
    scale = (grid + INTERPOLATE_OFFSET) / m
    out = F.interpolate(
        patches.reshape(1, m, m, -1).permute(0, 3, 1, 2),
        scale_factor=(scale, scale),
        mode="bicubic",
        antialias=False,
    )
    if out.shape[-2:] != (grid, grid):
        raise KeyMapError(f"pos_embed: {m}x{m} does not resample to {grid}x{grid}")
    flat = out.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos_embed.dtype)
    return torch.cat([cls, flat], dim=1)


def to_timm(
    raw: Any, layout: Layout, target: Mapping[str, torch.Size]
) -> tuple[dict[str, torch.Tensor], Conversion]:
    """The state dict for a timm network of parameter shapes ``target`` from a checkpoint."""
    source, dropped = backbone_tensors(raw, layout)
    size = chunk_size(source)
    fill = StateFill(target, "network")
    for key, value in source.items():
        if layout != "timm" and key in TRAINING_ONLY:
            dropped.append(key)
            continue
        fill.put(timm_name(key, layout, size), value, key)
    fill.check_complete()
    out = fill.out
    resampled = None
    if layout != "timm" and out["pos_embed"].shape != target["pos_embed"]:
        before = out["pos_embed"].shape[1] - 1
        grid = math.isqrt(target["pos_embed"][1] - 1)
        out["pos_embed"] = resample_grid(out["pos_embed"], grid)
        resampled = f"{math.isqrt(before)}x{math.isqrt(before)} -> {grid}x{grid}"
    fill.check_shapes()
    report = Conversion(
        layout=layout, tensors=len(out), dropped=sorted(dropped), pos_embed_resampled=resampled
    )
    return out, report
