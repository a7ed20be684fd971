"""The detector's pieces: box geometry under augmentation, targets, assignment, and learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from toy_models import TOY_ENCODER, TOY_TILING

from smartccs.labels import SlideBoxes
from smartccs.metrics.detection import Boxes, DetectionReport, detection_report
from smartccs.models.artifacts import Architecture
from smartccs.models.detector import (
    DETECTION_CLASSES,
    CellDetector,
    HeadConfig,
    decode,
    detection_class,
)
from smartccs.models.encoder import build_from
from smartccs.train.detector import AugmentConfig, assign, augment, flip_rotate_boxes, tile_targets


def _box_of_ink(img: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(img[0] > 0.5, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


@pytest.mark.parametrize("k", range(4))
@pytest.mark.parametrize("flip", [False, True])
def test_boxes_follow_the_pixels_under_every_square_symmetry(k, flip):
    img = torch.zeros(3, 32, 32)
    img[:, 3:9, 20:30] = 1.0  # x 20..30, y 3..9: asymmetric on purpose
    box = torch.tensor([[20.0, 3.0, 30.0, 9.0]])
    out_img, out_box = flip_rotate_boxes(img, box, k, flip)
    assert out_box[0].tolist() == _box_of_ink(out_img)


def test_tile_targets_keep_cells_centred_on_the_tile_scaled_and_clipped():
    cells = SlideBoxes(
        boxes=np.array(
            [
                [110, 110, 150, 150],  # inside
                [190, 100, 230, 140],  # centre (210) inside, right edge beyond the tile: clipped
                [250, 100, 290, 140],  # centre outside
                [120, 160, 130, 170],  # inflammatory: ignored by the detector
            ],
            float,
        ),
        classes=np.array(["HSIL", "superficial", "LSIL", "inflammatory"], dtype=object),
    )
    boxes, labels = tile_targets(cells, x0=100, y0=100, w0=120, h0=120, input_px=60)
    assert labels.tolist() == [DETECTION_CLASSES.index("HSIL"), DETECTION_CLASSES.index("squamous")]
    np.testing.assert_allclose(boxes, [[5, 5, 25, 25], [45, 0, 60, 20]])


def test_detection_classes_map_bethesda_and_squamous_and_ignore_the_rest():
    assert detection_class("AGC") == DETECTION_CLASSES.index("AGC")
    assert detection_class("parabasal") == detection_class("intermediate") == 6
    assert detection_class("debris") is None


def test_assignment_takes_locations_near_a_centre_and_prefers_the_smaller_box():
    centers = torch.tensor([[20.0, 20.0], [60.0, 60.0], [100.0, 100.0]])
    boxes = torch.tensor([[0.0, 0.0, 80.0, 80.0], [10.0, 10.0, 30.0, 30.0]])
    match = assign(centers, boxes, stride=8, radius=1.5)
    # (20,20) lies in both: the small box wins; (60,60) is inside the big box but 20 px from
    # its centre (40,40) > 12 px: background; (100,100) is outside everything.
    assert match.tolist() == [1, -1, -1]


def test_decode_inverts_side_distances():
    centers = torch.tensor([[10.0, 20.0]])
    assert decode(centers, torch.tensor([[1.0, 2.0, 3.0, 4.0]])).tolist() == [[9, 18, 13, 24]]


def _squares(n: int, g: torch.Generator) -> tuple[torch.Tensor, list, list]:
    """Dark squares of two sizes on bright glass: class 0 small, class 1 large."""
    imgs, boxes, labels = torch.ones(n, 3, 64, 64), [], []
    for i in range(n):
        bs, ls = [], []
        for _ in range(2):
            cls = int(torch.randint(0, 2, (1,), generator=g))
            side = 10 if cls == 0 else 22
            x, y = (int(v) for v in torch.randint(0, 64 - side, (2,), generator=g))
            imgs[i, :, y : y + side, x : x + side] = 0.2 if cls == 0 else 0.5
            bs.append([x, y, x + side, y + side])
            ls.append(cls)
        boxes.append(torch.tensor(bs, dtype=torch.float32))
        labels.append(torch.tensor(ls))
    return imgs, boxes, labels


def test_the_detector_learns_to_find_and_tell_apart_two_kinds_of_object():
    """A few hundred steps on toy squares: boxes, classes and NMS must all work to pass."""
    from smartccs.train.detector import DetectorConfig, DetectorLearner

    torch.manual_seed(0)
    arch = Architecture(
        timm_name="vit_tiny_patch16_224",
        kwargs={
            "img_size": 64,
            "patch_size": 8,
            "embed_dim": 48,
            "depth": 2,
            "num_heads": 2,
            "dynamic_img_size": True,
        },
    )
    cfg = DetectorConfig(
        run_name="toy",
        store={"uri": "/nonexistent"},
        input_px=64,
        head=HeadConfig(width=32),
        optimizer={"lr": 2e-3, "warmup_steps": 10, "weight_decay": 0.0},
        max_steps=250,
    )
    model = CellDetector(build_from(arch), cfg.head, num_classes=2)
    learner = DetectorLearner.__new__(DetectorLearner)  # only the loss; no store, no labels
    learner.cfg, learner.model, learner.raw = cfg, model, model
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(250):
        x, boxes, labels = _squares(8, g)
        loss = learner.loss(x, boxes, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, boxes, labels = _squares(32, torch.Generator().manual_seed(1))
    model.eval()
    dets = model.detect(x)
    pred = Boxes(
        image_ids=np.concatenate([np.full(len(d.scores), i) for i, d in enumerate(dets)]),
        boxes=np.concatenate([d.boxes.numpy() for d in dets]),
        labels=np.concatenate([d.labels.numpy() for d in dets]),
        scores=np.concatenate([d.scores.numpy() for d in dets]),
    )
    gt = Boxes(
        image_ids=np.concatenate([np.full(len(b), i) for i, b in enumerate(boxes)]),
        boxes=torch.cat(boxes).numpy(),
        labels=torch.cat(labels).numpy(),
    )
    report = detection_report(pred, gt, ["small", "large"])
    assert report.map > 0.7, report


def test_ap_by_cells_weighs_classes_by_their_held_out_cells():
    from smartccs.train.detector import abnormal_ap_by_cells, abnormal_map

    ap = {"ASC-US": 0.6, "LSIL": 0.0, "ASC-H": float("nan"), "squamous": 0.9}
    n_gt = {"ASC-US": 117, "LSIL": 3, "ASC-H": 0, "squamous": 5000}
    assert abnormal_ap_by_cells(ap, n_gt) == pytest.approx(0.6 * 117 / 120)
    report = DetectionReport(
        iou_threshold=0.5, ap=ap, map=float("nan"), n_gt=n_gt, n_pred={k: 0 for k in ap}
    )
    assert abnormal_map(report) == pytest.approx(0.3), "the class mean counts LSIL's 3 cells once"
    assert np.isnan(abnormal_ap_by_cells({"squamous": 0.9}, {"squamous": 10}))


def test_detector_augmentation_blurs_pixels_and_leaves_boxes_where_the_cells_are():
    img = (torch.rand(3, 64, 64) > 0.5).float()
    box = torch.tensor([[8.0, 12.0, 30.0, 40.0]])
    sharp = AugmentConfig(color_p=0.0)
    blurred = sharp.model_copy(update={"blur_p": 1.0, "blur_sigma_px": (1.5, 2.0)})
    a_img, a_box = augment(img, box, sharp, torch.Generator().manual_seed(4))
    b_img, b_box = augment(img, box, blurred, torch.Generator().manual_seed(4))
    torch.testing.assert_close(a_box, b_box)
    edges = lambda x: (x[:, :, 1:] - x[:, :, :-1]).abs().mean()  # noqa: E731
    assert edges(b_img) < 0.5 * edges(a_img)
    with pytest.raises(ValueError, match="blur_sigma_px"):
        AugmentConfig(blur_sigma_px=(2.0, 1.0))


def test_detector_steps_its_backbone_blocks_at_layer_decayed_rates():
    """The head learns at the scheduled rate, the top block at backbone_lr_scale x decay, the
    embeddings slowest: the pretrained lower layers are what finetuning should keep."""
    from smartccs.models.artifacts import ModelCard
    from smartccs.train.detector import DetectorConfig, DetectorLearner
    from smartccs.train.loop import lr_at, optimizer_step

    cfg = DetectorConfig(
        run_name="toy", store={"uri": "/nonexistent"}, input_px=64, head=HeadConfig(width=16),
        backbone_lr_scale=0.5, layer_decay=0.5, optimizer={"warmup_steps": 0},
    )  # fmt: skip
    card = ModelCard(
        name="enc", architecture=TOY_ENCODER, task="encoder", tiling=TOY_TILING, synthetic=True
    )
    learner = DetectorLearner(cfg, torch.device("cpu"), encoder=card, encoder_state=None, labels={})
    loss = sum(p.sum() for p in learner.params) * 0
    optimizer_step(learner.opt, learner.params, loss, 5, cfg)
    lr = {id(p): g["lr"] for g in learner.opt.param_groups for p in g["params"]}
    backbone = learner.raw.backbone
    depth = len(backbone.blocks)
    base = lr_at(5, cfg)
    assert lr[id(learner.raw.cls_head.weight)] == pytest.approx(base)
    assert lr[id(backbone.norm.weight)] == pytest.approx(base * 0.5)
    assert lr[id(backbone.blocks[-1].attn.qkv.weight)] == pytest.approx(base * 0.5 * 0.5)
    assert lr[id(backbone.patch_embed.proj.weight)] == pytest.approx(
        base * 0.5 * 0.5 ** (depth + 1)
    )
    assert len(lr) == len(learner.params)


def test_a_checkpoint_from_before_layer_decay_resumes_without_it():
    """Runs checkpointed with one backbone group and one head group must still resume."""
    from smartccs.models.artifacts import ModelCard
    from smartccs.train.detector import DetectorConfig, DetectorLearner

    cfg = DetectorConfig(run_name="toy", store={"uri": "/nonexistent"}, input_px=64)
    card = ModelCard(
        name="enc", architecture=TOY_ENCODER, task="encoder", tiling=TOY_TILING, synthetic=True
    )
    learner = DetectorLearner(cfg, torch.device("cpu"), encoder=card, encoder_state=None, labels={})
    backbone = list(learner.raw.backbone.parameters())
    ids = {id(p) for p in backbone}
    head = [p for p in learner.raw.parameters() if id(p) not in ids]
    old = torch.optim.AdamW([{"params": backbone, "lr_scale": 1.0}, {"params": head}])
    learner.load({"model": learner.raw.state_dict(), "optimizer": old.state_dict()})
    assert [len(g["params"]) for g in learner.opt.param_groups] == [len(backbone), len(head)]


def test_a_detector_card_with_a_backbone_window_rebuilds_a_detector_that_reads_in_windows():
    from smartccs.models.artifacts import ModelCard
    from smartccs.models.detector import build_detector

    def card(head: dict) -> ModelCard:
        return ModelCard(
            name="detector", architecture=TOY_ENCODER, task="detector",
            classes=list(DETECTION_CLASSES), head={"config": head, "input_px": 64},
            tiling=TOY_TILING, synthetic=True,
        )  # fmt: skip

    windowed = build_detector(card(HeadConfig(width=16, window_px=32).model_dump()))
    before = HeadConfig(width=16).model_dump()
    before.pop("window_px")  # a card written before the option existed
    whole = build_detector(card(before))
    assert (windowed.cfg.window_px, whole.cfg.window_px) == (32, None)
    whole.load_state_dict(windowed.state_dict())  # same weights: only the reading differs
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a, b = windowed.eval()(x), whole.eval()(x)
    assert a[0].shape == b[0].shape and not torch.allclose(a[0], b[0])


def test_a_frozen_backbone_stays_put_for_freeze_backbone_steps_then_learns_with_the_heads():
    """Linear probing, then finetuning: the heads learn from the first step, the backbone only
    from step ``freeze_backbone_steps`` (checked through the learner's real training step)."""
    from smartccs.models.artifacts import ModelCard
    from smartccs.train.detector import DetectorConfig, DetectorLearner

    cfg = DetectorConfig(
        run_name="toy", store={"uri": "/nonexistent"}, input_px=64, head=HeadConfig(width=16),
        freeze_backbone_steps=2, optimizer={"warmup_steps": 0, "lr": 1e-3},
        augment=AugmentConfig(color_p=0.0, blur_p=0.0),
    )  # fmt: skip
    card = ModelCard(
        name="enc", architecture=TOY_ENCODER, task="encoder", tiling=TOY_TILING, synthetic=True
    )
    key = ("c1", "b1", "s1")
    cells = SlideBoxes(boxes=np.array([[10.0, 12.0, 30.0, 34.0]]), classes=np.array(["HSIL"]))
    learner = DetectorLearner(
        cfg, torch.device("cpu"), encoder=card, encoder_state=None, labels={key: cells}
    )
    learner.prepare()
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 255, (2, 64, 64, 3), dtype=np.uint8),
        "center": np.array(["c1"] * 2), "batch": np.array(["b1"] * 2),
        "slide_id": np.array(["s1"] * 2), "x0": np.array([0, 8]), "y0": np.array([0, 4]),
        "w0": np.array([64, 64]), "h0": np.array([64, 64]),
    }  # fmt: skip
    backbone, head = learner.raw.backbone.patch_embed.proj.weight, learner.raw.cls_head.weight

    def moved(step: int) -> tuple[bool, bool]:
        b0, h0 = backbone.detach().clone(), head.detach().clone()
        learner.train_batch(batch, step, torch.Generator().manual_seed(step))
        return not torch.equal(b0, backbone), not torch.equal(h0, head)

    assert moved(0) == (False, True), "step 0: only the heads learn"
    assert moved(1) == (False, True), "weight decay must not touch a frozen backbone either"
    assert moved(2) == (True, True), "from freeze_backbone_steps on, the backbone learns too"
