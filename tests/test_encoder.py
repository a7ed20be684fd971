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
