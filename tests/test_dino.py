"""DINO pieces: EMA, centering, the loss learns; multi-crop views are well-formed and seeded."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from smartccs.models.artifacts import Normalization
from smartccs.models.encoder import build_encoder
from smartccs.train.dino import (
    DinoConfig,
    DINOHead,
    DINOLoss,
    MultiCropNet,
    ema_update,
    make_teacher,
    sinkhorn_knopp,
    teacher_momentum,
    teacher_temperature,
)
from smartccs.train.multicrop import (
    MultiCropConfig,
    brightness_contrast,
    draw_boxes,
    flip_rotate,
    gaussian_blur,
    multi_crop,
    pick_inkiest,
    random_resized_crop,
    stain_integral,
    stain_jitter,
)

SMALL = DinoConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16)
CROPS = MultiCropConfig(
    global_size=32,
    local_size=16,
    n_local=2,
    normalization=Normalization(mean=(0.8, 0.8, 0.8), std=(0.15, 0.15, 0.15)),
)


def toy_tiles(n: int = 8, px: int = 48) -> np.ndarray:
    """Bright glass with dark round 'nuclei' of a few colours and sizes."""
    rng = np.random.default_rng(0)
    tiles = np.full((n, px, px, 3), 230, np.uint8)
    yy, xx = np.ogrid[:px, :px]
    for i in range(n):
        colour = [(60, 40, 120), (150, 60, 90), (40, 110, 60), (120, 120, 30)][i % 4]
        for _ in range(4):
            y, x = rng.integers(4, px - 4, 2)
            r = 3 + 3 * (i % 2)
            tiles[i][(yy - y) ** 2 + (xx - x) ** 2 < r * r] = colour
    return tiles


def tiny_net(cfg: DinoConfig, seed: int) -> MultiCropNet:
    torch.manual_seed(seed)
    backbone = build_encoder(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        dynamic_img_size=True,
    )
    return MultiCropNet(backbone, DINOHead(32, cfg))


def test_ema_moves_the_teacher_by_the_expected_amount():
    student = nn.Linear(3, 2)
    teacher = make_teacher(student)
    assert not any(p.requires_grad for p in teacher.parameters())
    before = [p.clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema_update(student, teacher, 0.9)
    for t0, s, t in zip(before, student.parameters(), teacher.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)
        torch.testing.assert_close(t - t0, torch.full_like(t, 0.1))  # 10% of the 1.0 gap
    moved = [p.clone() for p in teacher.parameters()]
    ema_update(student, teacher, 1.0)  # momentum 1: the teacher stays put
    for m, t in zip(moved, teacher.parameters(), strict=True):
        assert torch.equal(m, t)


def test_schedules():
    cfg = DinoConfig(
        momentum_teacher=0.99, warmup_teacher_temp=0.02, teacher_temp=0.06,
        warmup_teacher_temp_steps=10,
    )  # fmt: skip
    assert teacher_momentum(0, 100, cfg) == pytest.approx(0.99)
    assert teacher_momentum(50, 100, cfg) == pytest.approx(0.995)
    assert teacher_momentum(100, 100, cfg) == pytest.approx(1.0)
    assert teacher_temperature(0, cfg) == pytest.approx(0.02)
    assert teacher_temperature(5, cfg) == pytest.approx(0.04)
    assert teacher_temperature(10, cfg) == teacher_temperature(99, cfg) == pytest.approx(0.06)


def test_center_tracks_the_teacher_mean():
    loss = DINOLoss(SMALL)
    teacher_out = torch.randn(16, SMALL.out_dim)
    mean = teacher_out.mean(0, keepdim=True)
    for n in range(1, 31):
        loss.update_center(teacher_out)
        torch.testing.assert_close(loss.center, (1 - 0.9**n) * mean)
    assert torch.allclose(loss.center, mean, atol=0.05 * mean.abs().max().item())


def test_sinkhorn_targets_are_distributions_balanced_over_prototypes():
    cfg = SMALL.model_copy(update={"centering": "sinkhorn", "sinkhorn_iterations": 50})
    logits = torch.randn(8, cfg.out_dim) * 0.01 + torch.randn(1, cfg.out_dim)  # near-identical
    q = sinkhorn_knopp(logits, 0.04, cfg)
    torch.testing.assert_close(q.sum(1), torch.ones(8), atol=1e-4, rtol=0)
    torch.testing.assert_close(q.sum(0), torch.full((cfg.out_dim,), 8 / cfg.out_dim), atol=1e-3,
                               rtol=0)  # fmt: skip
    assert torch.softmax(logits / 0.04, -1).sum(0).max() > 2 * q.sum(0).max(), "balanced"
    loss = DINOLoss(cfg)
    assert torch.isfinite(loss([logits, logits], [logits, logits], step=0))
    assert loss.center.abs().sum() > 0, "the center is still tracked (for a switch back)"


def test_crop_tries_keep_the_region_with_the_most_stain():
    img = torch.ones(3, 64, 64)
    img[:, 40:56, 40:56] = 0.2  # one dark cell in a corner of bare glass
    dark = [random_resized_crop(img, 16, (0.06, 0.06), torch.Generator().manual_seed(s), tries=8)
            for s in range(10)]  # fmt: skip
    plain = [random_resized_crop(img, 16, (0.06, 0.06), torch.Generator().manual_seed(s))
             for s in range(10)]  # fmt: skip
    assert sum(float(c.mean()) for c in dark) < sum(float(c.mean()) for c in plain)
    assert min(float(c.min()) for c in dark) < 0.3


def test_crop_tries_pick_the_first_region_when_all_hold_the_same_stain():
    tiles = torch.ones(2, 3, 32, 32)
    tiles[1, :, :8, :8] = 0.5  # tile 1: a dark corner the third candidate holds
    candidates = [[(0, 8, 8, 8), (8, 8, 8, 8), (0, 0, 4, 4)]] * 2
    assert pick_inkiest(stain_integral(tiles), candidates) == [(0, 8, 8, 8), (0, 0, 4, 4)]
    one = [draw_boxes(torch.Generator().manual_seed(0), 32, 32, (0.1, 0.2))] * 2
    assert pick_inkiest(stain_integral(tiles), one) == [one[0][0]] * 2


def views_tile_by_tile(tiles: np.ndarray, cfg: MultiCropConfig, g: torch.Generator) -> list:
    """What ``multi_crop`` must equal: each tile cut alone by the single-image ops, with the
    draws in their documented order (crop, symmetry, stain and exposure, blur)."""
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (cfg.normalization.mean,
                                                         cfg.normalization.std))  # fmt: skip
    specs = [(cfg.global_size, cfg.global_scale, p) for p in cfg.global_blur_p]
    specs += [(cfg.local_size, cfg.local_scale, cfg.local_blur_p)] * cfg.n_local
    imgs = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    views = []
    for size, scale, blur_p in specs:
        batch = []
        for img in imgs:
            out = flip_rotate(random_resized_crop(img, size, scale, g, cfg.crop_tries), g)
            if bool(torch.rand(1, generator=g) < cfg.color_p):
                out = stain_jitter(out, g, cfg.stain_sigma, cfg.stain_bias, cfg.hue_deg)
                out = brightness_contrast(out, g, cfg.brightness, cfg.contrast)
            if bool(torch.rand(1, generator=g) < blur_p):
                lo, hi = cfg.blur_sigma
                u = float(torch.rand(1, generator=g, dtype=torch.float64))
                out = gaussian_blur(out, lo + (hi - lo) * u)
            batch.append((out - mean) / std)
        views.append(torch.stack(batch))
    return views


def test_multi_crop_views_equal_tile_by_tile_augmentation_in_draw_order():
    """The batch cuts each view at once; per tile it must stay the view the single-image ops
    give with the same draws, so a seed keeps its views and the recipe its meaning. Tiles of
    one batch take different branches here (stain or not, blur or not, kernel widths)."""
    cfg = CROPS.model_copy(update={"crop_tries": 3, "hue_deg": 30.0, "color_p": 0.5,
                                   "local_blur_p": 0.7, "global_blur_p": (0.6, 0.3)})  # fmt: skip
    tiles = toy_tiles(12)
    batched = multi_crop(tiles, cfg, torch.Generator().manual_seed(3))
    for got, want in zip(batched, views_tile_by_tile(tiles, cfg, torch.Generator().manual_seed(3)),
                         strict=True):  # fmt: skip
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_loss_pairs_only_different_views():
    loss = DINOLoss(SMALL.model_copy(update={"center_momentum": 0.0}))
    a, b = torch.randn(4, SMALL.out_dim), torch.randn(4, SMALL.out_dim)
    # student == teacher on view 0 and 1; the loss must not reward a view predicting itself
    value = loss([a, b], [a, b], step=0)
    q = torch.softmax(b / SMALL.teacher_temp, -1)
    expected = (-q * torch.log_softmax(a / SMALL.student_temp, -1)).sum(-1).mean()
    p = torch.softmax(a / SMALL.teacher_temp, -1)
    expected = (expected + (-p * torch.log_softmax(b / SMALL.student_temp, -1)).sum(-1).mean()) / 2
    torch.testing.assert_close(value, expected)


def test_student_learns_to_match_the_teacher():
    """A few dozen steps against a frozen, differently initialized teacher lower the loss.

    Teacher and center are frozen so that the targets hold still and only learning moves it.
    """
    cfg = SMALL.model_copy(update={"momentum_teacher": 1.0, "center_momentum": 1.0})
    student, teacher = tiny_net(cfg, seed=0), make_teacher(tiny_net(cfg, seed=1))
    loss_fn = DINOLoss(cfg)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    g, tiles, losses = torch.Generator().manual_seed(0), toy_tiles(), []
    for step in range(40):
        views = multi_crop(tiles, CROPS, g)
        with torch.no_grad():
            targets = teacher(views[:2])
        loss = loss_fn(student(views), targets, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema_update(student, teacher, teacher_momentum(step, 40, cfg))
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), np.round(losses, 2)


def test_full_dino_step_moves_the_teacher_toward_the_student():
    student = tiny_net(SMALL, seed=0)
    teacher = make_teacher(student)
    loss_fn = DINOLoss(SMALL)
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.1)
    views = multi_crop(toy_tiles(4), CROPS, torch.Generator().manual_seed(0))
    out = student(views)
    assert [o.shape for o in out] == [(4, SMALL.out_dim)] * CROPS.n_crops
    with torch.no_grad():
        t_out = teacher(views[:2])
    loss_fn(out, t_out, 0).backward()
    opt.step()
    gap = [
        (s - t).abs().sum() for s, t in zip(student.parameters(), teacher.parameters(), strict=True)
    ]
    ema_update(student, teacher, 0.5)
    after = [
        (s - t).abs().sum() for s, t in zip(student.parameters(), teacher.parameters(), strict=True)
    ]
    assert sum(gap) > 0
    torch.testing.assert_close(sum(after), 0.5 * sum(gap))


def test_augmentations_keep_shape_dtype_and_range():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 40, 40)
    for out in (
        flip_rotate(img, g),
        stain_jitter(img, g, 0.2, 0.1),
        gaussian_blur(img, 1.5),
        brightness_contrast(img, g, 0.3, 0.3),
    ):
        assert out.shape == img.shape and out.dtype == img.dtype
        assert out.min() >= 0 and out.max() <= 1
    crop = random_resized_crop(img, 24, (0.1, 0.5), g)
    assert crop.shape == (3, 24, 24) and crop.dtype == torch.float32
    # no jitter is the identity: the OD round trip is exact
    torch.testing.assert_close(stain_jitter(img, g, 0.0, 0.0), img)
    assert not torch.allclose(stain_jitter(img, g, 0.2, 0.1), img)


def test_stain_jitter_changes_stained_pixels_not_white_glass():
    g = torch.Generator().manual_seed(3)
    img = torch.ones(3, 8, 8)
    img[:, :4] = torch.tensor([0.3, 0.2, 0.5]).view(3, 1, 1)  # a purple nucleus on white glass
    out = stain_jitter(img, g, 0.3, 0.0)  # scale only: zero stain stays zero
    torch.testing.assert_close(out[:, 4:], img[:, 4:])
    assert (out[:, :4] - img[:, :4]).abs().max() > 0.01


def test_multi_crop_views_are_seeded_and_well_formed():
    tiles = toy_tiles(3)
    views = multi_crop(tiles, CROPS, torch.Generator().manual_seed(7))
    assert len(views) == CROPS.n_crops == 4
    assert [tuple(v.shape) for v in views] == [(3, 3, 32, 32)] * 2 + [(3, 3, 16, 16)] * 2
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in views)
    again = multi_crop(torch.from_numpy(tiles), CROPS, torch.Generator().manual_seed(7))
    for a, b in zip(views, again, strict=True):
        assert torch.equal(a, b)
    other = multi_crop(tiles, CROPS, torch.Generator().manual_seed(8))
    assert not torch.equal(views[0], other[0])
    assert not torch.equal(views[0], views[1])  # two global views of one tile differ
    with pytest.raises(ValueError, match="uint8"):
        multi_crop(tiles.astype(np.float32), CROPS, torch.Generator())


def test_multi_crop_hue_turns_the_stain_of_each_view_but_leaves_glass_white():
    """``hue_deg``: views of one tile differ in the stain's hue as two centers' do, while the
    glass stays white and the amount of stain (optical density along the grey axis) stays."""
    cfg = CROPS.model_copy(
        update={"hue_deg": 30, "n_local": 0, "color_p": 1.0, "stain_sigma": 0.0,
                "stain_bias": 0.0, "global_blur_p": (0.0, 0.0), "brightness": 0.0,
                "contrast": 0.0}
    )  # fmt: skip
    tiles = np.full((2, 48, 48, 3), 255, np.uint8)
    tiles[1] = (90, 60, 150)  # all stain: a purple tile
    norm = CROPS.normalization
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (norm.mean, norm.std))
    # the two global views of each tile, back in [0, 1] RGB
    views = multi_crop(tiles, cfg, torch.Generator().manual_seed(1))
    first, second = (v * std + mean for v in views)
    for view in (first, second):
        torch.testing.assert_close(view[0], torch.ones_like(view[0]), atol=1e-5, rtol=0)

    def od(rgb: torch.Tensor) -> torch.Tensor:
        return -torch.log((rgb.double() * 255 + 1) / 256)

    purple = od(torch.tensor([90, 60, 150]) / 255)
    turned = [od(v[1, :, 16, 16]) for v in (first, second)]
    assert all((v - purple).abs().max() > 0.02 for v in turned), "each view's hue is turned"
    assert (turned[0] - turned[1]).abs().max() > 0.02, "and by different angles"
    for v in turned:  # a turn about the grey axis keeps the OD's grey component
        torch.testing.assert_close(v.sum(), purple.sum(), atol=2e-2, rtol=0)
    plain = CROPS.model_copy(update={"hue_deg": 0.0})
    for a, b in zip(
        multi_crop(toy_tiles(2), CROPS, torch.Generator().manual_seed(4)),
        multi_crop(toy_tiles(2), plain, torch.Generator().manual_seed(4)),
        strict=True,
    ):
        assert torch.equal(a, b), "hue_deg 0 draws nothing: older runs keep their views"


@pytest.fixture(scope="module")
def cytology_tiles(tmp_path_factory) -> np.ndarray:
    """Real synthetic cytology tiles (mostly bright glass), as the demo job streams them."""
    import yaml

    from smartccs.slide.reader import open_slide
    from smartccs.slide.tiling import TilingConfig, plan_tiles, read_tile
    from smartccs.synth.cohort import generate_cohort

    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(out, centers=1, slides_per_center=2, size="tiny", seed=0, workers=1,
                    progress=False)  # fmt: skip
    raw = yaml.safe_load(
        (Path(__file__).parents[1] / "jobs/configs/pretrain-demo.yaml").read_text()
    )
    tiling = TilingConfig.model_validate(raw["stream"]["tiling"])
    tiles = []
    for path in sorted(out.rglob("*.svs")):
        slide = open_slide(path)
        tiles += [read_tile(slide, spec, tiling) for spec in plan_tiles(slide, tiling).tiles]
    assert len(tiles) >= 16
    return np.stack(tiles)


def test_demo_config_does_not_collapse_on_cytology_tiles(cytology_tiles):
    """A short DINO run with the demo job's settings keeps a per-tile signal and learns.

    Regressions: with ImageNet normalization and an unscaled lr the teacher's sharpened, centered
    output went uniform (entropy ln(out_dim), loss 8.318) within 20 steps and the backbone
    features stopped depending on the tile; with brightness/contrast jitter on these mostly-glass
    tiles the student collapsed within 25 steps and the loss stayed at ln(out_dim).
    """
    import yaml

    from smartccs.train.normalization import tile_statistics
    from smartccs.train.pretrain import Learner, PretrainConfig

    raw = yaml.safe_load(
        (Path(__file__).parents[1] / "jobs/configs/pretrain-demo.yaml").read_text()
    )
    raw["store"] = {"uri": "/nonexistent"}
    cfg = PretrainConfig.model_validate(raw)
    assert cfg.crops.normalization == "auto"  # the job estimates it from its tiles, as here
    norm = tile_statistics([cytology_tiles], cfg.normalization_tiles)
    cfg = cfg.model_copy(update={"crops": cfg.crops.model_copy(update={"normalization": norm})})
    torch.manual_seed(0)
    learner = Learner(cfg, torch.device("cpu"))
    learner.prepare()
    g, probe, rng = torch.Generator().manual_seed(0), torch.Generator(), np.random.default_rng(0)
    entropies, feature_std, losses = [], [], []
    for step in range(60):
        images = cytology_tiles[rng.choice(len(cytology_tiles), cfg.batch_size, replace=False)]
        with torch.no_grad():  # measure the teacher on this batch, then take the job's step
            views = multi_crop(images, cfg.crops, probe.manual_seed(step))
            t = torch.cat(learner.teacher(views[:2])) - learner.loss_fn.center
            p = torch.softmax(t / teacher_temperature(step, cfg.dino), dim=-1)
            entropies.append(float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean()))
            feature_std.append(float(learner.teacher.backbone(views[0]).std(0).mean()))
        learner.step(images, step, g)
        losses.append(learner.last_terms["dino"])  # the DINO term (the iBOT one comes on top)
    uniform = math.log(cfg.dino.out_dim)
    late_entropy, late_std = np.mean(entropies[-10:]), np.mean(feature_std[-10:])
    assert late_entropy < uniform - 0.5, (np.round(entropies, 3), uniform)
    assert late_std > 0.2, np.round(feature_std, 3)
    assert np.mean(losses[-10:]) < uniform - 0.3, ("the student learns", np.round(losses, 2))


def test_koleo_is_lower_for_spread_embeddings_and_pushes_neighbours_apart():
    from smartccs.train.dino import koleo_loss

    g = torch.Generator().manual_seed(0)
    spread = torch.randn(32, 16, generator=g)
    clustered = torch.randn(1, 16, generator=g) + 0.01 * torch.randn(32, 16, generator=g)
    assert koleo_loss(spread) < koleo_loss(clustered)
    x = clustered.clone().requires_grad_(True)
    koleo_loss(x).backward()
    with torch.no_grad():
        stepped = x - 0.1 * x.grad
    assert koleo_loss(stepped) < koleo_loss(clustered)


def test_the_pretraining_step_adds_koleo_when_weighted():
    from smartccs.models.artifacts import Architecture, Normalization
    from smartccs.train.multicrop import MultiCropConfig
    from smartccs.train.pretrain import Learner, PretrainConfig

    arch = Architecture(
        timm_name="vit_tiny_patch16_224",
        kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2,
                "dynamic_img_size": True},
    )  # fmt: skip
    losses = {}
    for weight in (0.0, 1.0):
        cfg = PretrainConfig(
            run_name="koleo", store={"uri": "/nonexistent"}, encoder=arch, batch_size=4,
            crops=MultiCropConfig(global_size=32, local_size=16, n_local=1,
                                  normalization=Normalization()),
            dino=DinoConfig(out_dim=32, hidden_dim=16, bottleneck_dim=8, koleo_weight=weight),
        )  # fmt: skip
        torch.manual_seed(0)
        learner = Learner(cfg, torch.device("cpu"))
        learner.prepare()
        images = np.random.default_rng(0).integers(0, 255, (4, 48, 48, 3), dtype=np.uint8)
        losses[weight] = learner.step(images, 0, torch.Generator().manual_seed(0))
    assert np.isfinite(losses[1.0]) and losses[1.0] != losses[0.0]


# -- iBOT masked patch prediction -----------------------------------------------------------


def test_patch_masks_follow_the_ratio_and_the_seed():
    from smartccs.train.dino import IbotConfig, patch_masks

    cfg = IbotConfig(weight=1.0, mask_ratio=(0.2, 0.4), mask_p=0.5)
    masks = patch_masks(200, 36, cfg, torch.Generator().manual_seed(0))
    assert masks is not None and masks.shape == (200, 36) and masks.dtype == torch.bool
    masked = masks.any(dim=1)
    assert 0.35 < masked.float().mean() < 0.65  # mask_p of the images
    share = masks[masked].float().mean(dim=1)
    assert share.min() >= 7 / 36 and share.max() <= 15 / 36  # round(0.2..0.4 x 36)
    again = patch_masks(200, 36, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(masks, again)
    assert patch_masks(8, 36, cfg.model_copy(update={"mask_p": 0.0}), torch.Generator()) is None
    with pytest.raises(ValueError):
        IbotConfig(mask_ratio=(0.5, 0.2))


def test_masked_patches_take_the_mask_token_and_only_they_change_at_the_input():
    torch.manual_seed(0)
    backbone = build_encoder(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
        dynamic_img_size=True,
    )  # fmt: skip
    net = MultiCropNet(backbone, DINOHead(32, SMALL), mask_token=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # unmasked, the token path is timm's own forward_features
        torch.testing.assert_close(net.tokens(x), backbone.forward_features(x))
        mask = torch.zeros(2, 16, dtype=torch.bool)
        mask[0, :5] = True
        masked = net.tokens(x, mask)
        assert not torch.allclose(masked[0], net.tokens(x)[0])
        torch.testing.assert_close(masked[1], net.tokens(x)[1])  # image 1 had no mask
        # a masked patch no longer depends on its pixels
        y = x.clone()
        y[0, :, :8, :8] = 5.0  # patch 0 of image 0, which is masked
        torch.testing.assert_close(net.tokens(y, mask), masked)
        out = net([x, x, torch.randn(2, 3, 16, 16)], masks=[mask, None])
    assert [o.shape for o in out] == [(2, SMALL.out_dim)] * 3
    assert net.patch_outputs is not None
    assert [p.shape for p in net.patch_outputs] == [(2, 16, SMALL.out_dim)] * 2
    # the encoder artifact is the backbone alone: no mask token in its weights
    assert not any("mask" in k for k in backbone.state_dict())
    with pytest.raises(ValueError, match="mask_token"):
        tiny_net(SMALL, seed=0).tokens(x, mask)


def test_ibot_loss_reads_masked_positions_only_and_tracks_its_center():
    from smartccs.train.dino import IbotConfig, IBOTPatchLoss

    cfg = IbotConfig(weight=1.0, center_momentum=0.5)
    loss_fn = IBOTPatchLoss(cfg, out_dim=8, student_temp=0.1)
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(3, 4, 8, generator=g) for _ in range(2)]
    student = [torch.randn(3, 4, 8, generator=g) for _ in range(2)]
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, 1] = True
    base = loss_fn(student, teacher, [mask, None])
    assert base > 0
    expected_center = 0.5 * torch.cat(teacher).reshape(-1, 8).mean(0)
    torch.testing.assert_close(loss_fn.center.view(-1), expected_center)
    changed = [s.clone() for s in student]
    changed[0][0, 0] += 10  # an unmasked position of a masked image
    changed[0][1] += 10  # an image without a mask
    changed[1] += 10  # a view without a mask
    loss_fn.center.copy_(torch.zeros(1, 1, 8))
    again = loss_fn(changed, teacher, [mask, None])
    torch.testing.assert_close(again, base)
    assert loss_fn([s.clone() for s in student], teacher, [None, None]) == 0


def test_the_pretraining_step_with_ibot_learns_patches_and_checkpoints_its_center():
    from smartccs.models.artifacts import Architecture, Normalization
    from smartccs.train.dino import IbotConfig
    from smartccs.train.pretrain import Learner, PretrainConfig

    arch = Architecture(
        timm_name="vit_tiny_patch16_224",
        kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2,
                "dynamic_img_size": True},
    )  # fmt: skip
    cfg = PretrainConfig(
        run_name="ibot", store={"uri": "/nonexistent"}, encoder=arch, batch_size=4,
        crops=MultiCropConfig(global_size=32, local_size=16, n_local=1,
                              normalization=Normalization()),
        dino=DinoConfig(out_dim=32, hidden_dim=16, bottleneck_dim=8),
        ibot=IbotConfig(weight=1.0, mask_p=1.0),
    )  # fmt: skip
    torch.manual_seed(0)
    learner = Learner(cfg, torch.device("cpu"))
    learner.prepare()
    assert learner.raw_student.mask_token is not None
    images = toy_tiles(4, 48)
    token = learner.raw_student.mask_token.detach().clone()
    losses = [learner.step(images, i, torch.Generator().manual_seed(i)) for i in range(3)]
    assert np.isfinite(losses).all()
    assert not torch.equal(learner.raw_student.mask_token.detach(), token), "the token learns"
    state = learner.state()
    assert state["ibot_loss"]["center"].abs().sum() > 0
    torch.manual_seed(1)
    resumed = Learner(cfg, torch.device("cpu"))
    resumed.load(state)
    resumed.prepare()
    assert resumed.ibot_loss is not None
    torch.testing.assert_close(resumed.ibot_loss.center, learner.ibot_loss.center)
    # the same next step from the same state: the resumed run continues the same run
    a = learner.step(images, 3, torch.Generator().manual_seed(3))
    b = resumed.step(images, 3, torch.Generator().manual_seed(3))
    assert a == pytest.approx(b, rel=1e-5)
    # the encoder artifact (the teacher's backbone) has the plain ViT's keys
    plain = Learner(cfg.model_copy(update={"ibot": IbotConfig()}), torch.device("cpu"))
    assert plain.ibot_loss is None and plain.raw_student.mask_token is None
    assert (
        learner.teacher.backbone.state_dict().keys() == plain.teacher.backbone.state_dict().keys()
    )


def test_hue_jitter_turns_stain_keeps_glass_and_draws_nothing_when_off():
    img = torch.ones(3, 8, 8)
    img[:, :4] = torch.tensor([0.3, 0.2, 0.5]).view(3, 1, 1)
    out = stain_jitter(img, torch.Generator().manual_seed(5), 0.0, 0.0, hue_deg=30.0)
    torch.testing.assert_close(out[:, 4:], img[:, 4:])  # glass has no stain to turn
    od = lambda x: -torch.log((x.double() * 255 + 1) / 256)  # noqa: E731
    assert (out[:, :4] - img[:, :4]).abs().max() > 0.01
    torch.testing.assert_close(od(out[:, :4]).sum(0), od(img[:, :4]).sum(0), atol=2e-2, rtol=0)
    # hue off: the same random stream as before the option existed
    a, b = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    torch.testing.assert_close(stain_jitter(img, a, 0.2, 0.1), stain_jitter(img, b, 0.2, 0.1, 0.0))
    assert torch.rand(1, generator=a) == torch.rand(1, generator=b)
