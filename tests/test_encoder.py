"""The encoder is chosen by config: the demo ViT runs on CPU, the production ViT-L/14 builds."""

from __future__ import annotations

import pytest
import torch

from smartccs.models.encoder import (
    DEMO_ENCODER,
    PRODUCTION_ENCODER,
    build_encoder,
    build_from,
    embed_dim,
    input_size,
    layer_lr_scales,
)


def test_demo_encoder_embeds_a_batch_on_cpu():
    model = build_from(DEMO_ENCODER).eval()
    size = input_size(model)
    assert size == DEMO_ENCODER.kwargs["img_size"]
    with torch.no_grad():
        out = model(torch.rand(2, 3, size, size))
    assert out.shape == (2, embed_dim(model)) == (2, DEMO_ENCODER.kwargs["embed_dim"])
    assert torch.isfinite(out).all()


def test_img_size_and_width_come_from_kwargs():
    model = build_encoder("vit_tiny_patch16_224", img_size=112, embed_dim=64, depth=2, num_heads=2)
    assert (input_size(model), embed_dim(model)) == (112, 64)


def test_production_encoder_is_vit_large_patch14():
    with torch.device("meta"):  # the architecture, without allocating 1.2 GB of weights
        model = build_from(PRODUCTION_ENCODER)
    assert embed_dim(model) == 1024
    assert input_size(model) == 224
    assert tuple(model.patch_embed.patch_size) == (14, 14)
    assert len(model.blocks) == 24


def test_pretrained_weights_are_refused():
    with pytest.raises(ValueError, match="never downloaded"):
        build_encoder("vit_tiny_patch16_224", pretrained=True)


def test_layer_decay_slows_lower_blocks_and_covers_every_parameter_once():
    model = build_from(DEMO_ENCODER)
    groups = layer_lr_scales(model, 0.5)
    depth = len(model.blocks)
    scales = [s for s, _ in groups]
    assert scales == [0.5 ** (depth + 1 - i) for i in range(depth + 2)]  # embeddings .. norm
    params = [id(p) for _, ps in groups for p in ps]
    assert sorted(params) == sorted(id(p) for p in model.parameters())
    embeddings = {id(p) for p in groups[0][1]}
    assert {
        id(model.pos_embed),
        id(model.cls_token),
        id(model.patch_embed.proj.weight),
    } <= embeddings
    assert {id(p) for p in model.blocks[-1].parameters()} == {id(p) for p in groups[-2][1]}
    (scale, params), *rest = layer_lr_scales(model, 1.0)  # no decay: one group, model order
    assert (scale, rest, [id(p) for p in params]) == (1.0, [], [id(p) for p in model.parameters()])
