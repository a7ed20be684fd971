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
    patch_grid,
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


def test_patch_grid_of_the_whole_image_is_the_vit_tokens_folded_into_their_grid():
    model = build_from(DEMO_ENCODER).eval()
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        tokens = model.forward_features(x)[:, 1:]
        grid = patch_grid(model, x)
        assert torch.equal(patch_grid(model, x, window_px=96), grid)  # window >= input: whole
    assert grid.shape == (2, 96, 4, 6)
    assert torch.equal(grid[:, :, 1, 4], tokens[:, 1 * 6 + 4])


def test_windowed_patch_grid_takes_each_token_from_the_window_it_is_most_central_in():
    model = build_from(DEMO_ENCODER).eval()  # 16 px patches: a 256 px tile is 16x16 tokens
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        grid = patch_grid(model, x, window_px=128)  # windows start at 0, 64 and 128 px

        def window(top: int, left: int) -> torch.Tensor:
            crop = x[:, :, top : top + 128, left : left + 128]
            return model.forward_features(crop)[0, 1:].reshape(8, 8, -1)

    assert grid.shape == (1, 96, 16, 16)
    torch.testing.assert_close(grid[0, :, 8, 8], window(64, 64)[4, 4])  # tile centre
    torch.testing.assert_close(grid[0, :, 0, 15], window(0, 128)[0, 7])  # corner: edge window
    torch.testing.assert_close(grid[0, :, 5, 10], window(0, 128)[5, 2])  # 1.5 from a centre
    assert not torch.allclose(grid, patch_grid(model, x))  # not the whole-tile reading


@pytest.mark.parametrize("window_px", [40, 48, 160])
def test_a_window_off_the_patch_grid_or_larger_than_the_input_is_refused(window_px):
    model = build_from(DEMO_ENCODER).eval()
    x = torch.rand(1, 3, 256, 128)
    with pytest.raises(ValueError, match=f"window of {window_px} px"):
        patch_grid(model, x, window_px=window_px)
