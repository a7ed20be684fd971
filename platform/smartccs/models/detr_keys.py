"""Smart-CCS Deformable-DETR checkpoints -> transformers' ``DeformableDetrForObjectDetection``.

The reference (Det-cell, built on the MRT refactor of Deformable DETR) saves the bare
``model.state_dict()``; its backbone lives under ``backbone.intermediate_getter.`` (torchvision
ResNet names). Upstream Deformable-DETR files (``{"model": ...}``, backbone under
``backbone.0.body.``) use the same transformer and head names, so both are read. Every source
tensor fills exactly one target tensor with its exact shape, or is dropped by a named rule
(BatchNorm ``num_batches_tracked`` counters); anything else is refused naming the key, so a
file of another architecture never becomes a half-random detector.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from smartccs.models.state_fill import KeyMapError, StateFill, tensors_of

BACKBONE_PREFIXES = ("backbone.intermediate_getter.", "backbone.0.body.")
"""The reference's (torchvision IntermediateLayerGetter) and upstream Deformable-DETR's."""
HF_BACKBONE = "model.backbone.model."
DROPPED_SUFFIXES = (".num_batches_tracked",)
"""BatchNorm step counters: unused by frozen BatchNorm at inference, dropped."""
TIED = re.compile(r"(class_embed|bbox_embed)\.(\d+)\.(.+)")
"""Without box refinement both codes share one head across decoder layers."""

_ENC = {
    "norm1": "self_attn_layer_norm",
    "linear1": "mlp.fc1",
    "linear2": "mlp.fc2",
    "norm2": "final_layer_norm",
}
_DEC = {
    "cross_attn": "encoder_attn",
    "norm1": "encoder_attn_layer_norm",
    "self_attn.out_proj": "self_attn.o_proj",
    "norm2": "self_attn_layer_norm",
    "linear1": "mlp.fc1",
    "linear2": "mlp.fc2",
    "norm3": "final_layer_norm",
}
_TOP = {
    "query_embed.weight": "model.query_position_embeddings.weight",
    "transformer.level_embed": "model.level_embed",
}
_LAYER = re.compile(r"transformer\.(encoder|decoder)\.layers\.(\d+)\.(.+)")
_QKV = re.compile(r"(model\.decoder\.layers\.\d+\.self_attn)\.in_proj_(weight|bias)")


class DetrConversion(BaseModel):
    """What a conversion did, for the model card."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layout: str
    tensors: int
    dropped: list[str]


def source_tensors(raw: Any) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict of a checkpoint (bare, or under ``model``) and its backbone layout."""
    if isinstance(raw, Mapping) and "model" in raw and isinstance(raw["model"], Mapping):
        raw = raw["model"]
    raw = tensors_of(raw, "checkpoint")
    found = [p for p in BACKBONE_PREFIXES if any(k.startswith(p) for k in raw)]
    if len(found) != 1:
        raise KeyMapError(
            f"expected the backbone under one of {', '.join(BACKBONE_PREFIXES)}; "
            f"found {', '.join(found) or 'neither'}"
        )
    layout = "smart-ccs" if found[0] == BACKBONE_PREFIXES[0] else "deformable-detr"
    return raw, layout


def hf_name(key: str, backbone_prefix: str) -> str:
    """The transformers name of a source key (``in_proj_*`` still packed); refuses others."""
    if key.startswith(backbone_prefix):
        return HF_BACKBONE + key.removeprefix(backbone_prefix)
    if key in _TOP:
        return _TOP[key]
    for head in ("input_proj.", "class_embed.", "bbox_embed."):
        if key.startswith(head):
            return ("model." if head == "input_proj." else "") + key
    if key.startswith("transformer.reference_points."):
        return "model." + key.removeprefix("transformer.")
    if m := _LAYER.fullmatch(key):
        part, index, rest = m.groups()
        for old, new in (_ENC if part == "encoder" else _DEC).items():
            if rest.startswith(old + "."):
                rest = new + rest.removeprefix(old)
                break
        else:  # the encoder's deformable self_attn and the decoder's in_proj keep their names
            if not rest.startswith("self_attn."):
                raise KeyMapError(f"unexpected key {key!r}")
        return f"model.{part}.layers.{index}.{rest}"
    raise KeyMapError(f"unexpected key {key!r}")


def to_transformers(
    raw: Any, target: Mapping[str, torch.Size]
) -> tuple[dict[str, torch.Tensor], DetrConversion]:
    """The state dict for a transformers detector of tensor shapes ``target``."""
    source, layout = source_tensors(raw)
    prefix = BACKBONE_PREFIXES[0 if layout == "smart-ccs" else 1]
    fill = StateFill(target, "detector")
    dropped = []
    for key, value in source.items():
        if key.endswith(DROPPED_SUFFIXES):
            dropped.append(key)
            continue
        name = hf_name(key, prefix)
        if m := _QKV.fullmatch(name):
            if value.shape[0] % 3:
                raise KeyMapError(f"{key!r} has shape {tuple(value.shape)}: not 3 packed parts")
            for part, chunk in zip(("q", "k", "v"), value.chunk(3), strict=True):
                fill.put(f"{m[1]}.{part}_proj.{m[2]}", chunk.clone(), key)  # own storage
            continue
        # own storage: safetensors refuses tensors that share one (a tied head saved as such)
        fill.put(name, value.clone(), key)
    fill.check_complete()
    fill.check_shapes()
    _check_shared_heads(fill.out, fill.origin)
    return fill.out, DetrConversion(layout=layout, tensors=len(fill.out), dropped=sorted(dropped))


def _check_shared_heads(out: Mapping[str, torch.Tensor], origin: Mapping[str, str]) -> None:
    """transformers ties the per-layer heads to layer 0's: refuse per-layer heads that differ
    (a box-refinement checkpoint) rather than keep only one of them silently."""
    for name, value in out.items():
        m = TIED.fullmatch(name)
        if not m or m[2] == "0" or value.device.type == "meta":
            continue
        first = out[f"{m[1]}.0.{m[3]}"]
        if not torch.equal(value, first):
            raise KeyMapError(
                f"{origin[name]!r} differs from layer 0's: per-layer heads (box refinement) "
                "are not the reference's shared head"
            )


def to_reference(
    state: Mapping[str, torch.Tensor], backbone_prefix: str = BACKBONE_PREFIXES[0]
) -> dict[str, torch.Tensor]:
    """The inverse: a transformers state dict in the reference's layout (tests, exports)."""
    inverse = {v: k for k, v in _TOP.items()}
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if name.startswith(HF_BACKBONE):
            out[backbone_prefix + name.removeprefix(HF_BACKBONE)] = value
        elif name in inverse:
            out[inverse[name]] = value
        elif name.startswith(("model.input_proj.", "model.reference_points.")):
            key = name.removeprefix("model.")
            out[key if key.startswith("input_proj") else "transformer." + key] = value
        elif name.startswith(("class_embed.", "bbox_embed.")):
            out[name] = value
        elif m := re.fullmatch(r"model\.(encoder|decoder)\.layers\.(\d+)\.(.+)", name):
            _inverse_layer(out, m[1], m[2], m[3], value)
        else:
            raise KeyMapError(f"no reference name for {name!r}")
    return out


def _inverse_layer(out: dict, part: str, index: str, rest: str, value: torch.Tensor) -> None:
    base = f"transformer.{part}.layers.{index}."
    if part == "decoder" and (m := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)):
        packed = out.setdefault(f"{base}self_attn.in_proj_{m[2]}", [None, None, None])
        packed["qkv".index(m[1])] = value
        if all(p is not None for p in packed):
            out[f"{base}self_attn.in_proj_{m[2]}"] = torch.cat(packed)
        return
    for old, new in (_ENC if part == "encoder" else _DEC).items():
        if rest.startswith(new + "."):
            rest = old + rest.removeprefix(new)
            break
    out[base + rest] = value
