"""Finetuning the abnormal-cell detector on annotated cell boxes, as a Ray Train job.

Tiles of the training slides stream from the store through the same tile stream as screening;
each worker looks up the annotated cells that fall on its tiles (``labels/``), augments tile
and boxes together (the 8 square symmetries, stain and exposure jitter) and takes a step of
focal plus GIoU loss. The backbone starts from the pretrained encoder, or from random weights
of the same architecture for the ablation. The held-out slides' tiles are then scored (AP at
IoU 0.5 per class) and the detector is saved as ``models/<model_name>/<version>``. Targets,
augmentation and the sampled tile stream are ``smartccs.train.detector_data``; scoring is
``smartccs.train.detector_eval`` (both re-exported here).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from smartccs import layout
from smartccs.adaptation.stain import REFERENCE_KEY, stain_reference
from smartccs.batches import manifests_sha256, resolve_batches
from smartccs.data.tile_sampler import TileSampler, box_centres, centred_on
from smartccs.data.tiles import StreamConfig
from smartccs.errors import CCSError
from smartccs.ids import Id, SlideKey
from smartccs.labels import SlideBoxes, load_cell_labels
from smartccs.metrics.detection import DetectionReport
from smartccs.models.artifacts import ModelCard, config_sha256, load_card, load_model, save_model
from smartccs.models.detector import (
    DETECTION_CLASSES,
    CellDetector,
    HeadConfig,
    build_detector,
    decode,
    normalize,
    resize_tiles,
)
from smartccs.models.encoder import build_from, check_window, layer_lr_scales, patch_size
from smartccs.splits import SplitConfig, split_rows
from smartccs.store import Store
from smartccs.taxonomy import ABNORMAL_CLASSES
from smartccs.train.detector_data import (
    TARGET_COLUMNS,
    AugmentConfig,
    assign,
    augment,
    batch_targets,
    flip_rotate_boxes,
    label_budget,
    tile_targets,
    tiles_dataset,
)
from smartccs.train.detector_eval import (
    abnormal_ap_by_cells,
    abnormal_map,
    evaluate_detector,
    held_out_calibrations,
    report_metrics,
    score_batches,
    score_detector,
)
from smartccs.train.loop import RunFields, autocast_enabled, fit, optimizer_step, worker_loop
from smartccs.train.selection import batch_ids, check_splits, labelled_batches

__all__ = [  # the detector's public names, with those of its two helper modules
    "TARGET_COLUMNS",
    "AugmentConfig",
    "DetectorConfig",
    "DetectorLearner",
    "DetectorResult",
    "LossConfig",
    "TileSampler",
    "abnormal_ap_by_cells",
    "abnormal_map",
    "assign",
    "augment",
    "batch_targets",
    "box_centres",
    "centred_on",
    "detector_card",
    "evaluate_detector",
    "finetune_detector",
    "flip_rotate_boxes",
    "held_out_calibrations",
    "label_budget",
    "plan_detector",
    "report_metrics",
    "score_detector",
    "tile_targets",
    "tiles_dataset",
    "train_loop",
]

log = logging.getLogger(__name__)


class LossConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    focal_alpha: float = Field(default=0.25, gt=0, lt=1)
    focal_gamma: float = Field(default=2.0, ge=0)
    box_weight: float = Field(default=2.0, ge=0)
    center_radius: float = Field(
        default=1.5, gt=0, description="positives: locations within this many strides of a centre"
    )
    abnormal_weight: float = Field(
        default=4.0,
        ge=1,
        description="weight of an abnormal cell's positives against a normal squamous cell's: "
        "abnormal cells are a few percent of the cells, and they are what the detector is for",
    )


class DetectorConfig(RunFields):
    """One detector finetuning run; jobs/configs/detector-*.yaml is this model."""

    batches: list[str] = Field(
        default_factory=list,
        description="annotated 'center/batch' pairs; empty: every committed batch with cell "
        "annotations (the others are skipped, and logged)",
    )
    model_name: Id = "detector"
    encoder_model: Id = "encoder"
    encoder_version: str = Field(default="latest", description="resolved once, at job start")
    init: Literal["pretrained", "random"] = Field(
        default="pretrained", description="backbone from the encoder, or random (ablation)"
    )
    input_px: int = Field(default=128, ge=32, description="tiles are resized to this side")
    head: HeadConfig = HeadConfig()
    augment: AugmentConfig = AugmentConfig()
    loss: LossConfig = LossConfig()
    split: SplitConfig = SplitConfig()
    train_slides: int | None = Field(
        default=None,
        ge=1,
        description="label budget: train on only this many of the split's training slides "
        "(None: all). Taken in the split's seeded order, round-robin over center x "
        "normal/abnormal, so a small budget still spans centers and grades; test unchanged",
    )
    holdout_batches: list[str] = Field(
        default_factory=list,
        description="annotated 'center/batch' pairs kept out of training entirely (other "
        "centers: another stain, scanner and pixel size), scored as a second held-out report",
    )
    backbone_lr_scale: float = Field(default=1.0, ge=0, description="backbone lr / head lr")
    layer_decay: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="layer-wise lr decay over the backbone's blocks (1: none): block i of L "
        "learns at backbone_lr_scale x layer_decay^(L - i), the embeddings slowest",
    )
    freeze_backbone_steps: int = Field(
        default=0,
        ge=0,
        description="the first steps train the neck and heads on a fixed backbone, then all "
        "of it learns (linear probing, then finetuning): the heads start from what the "
        "pretrained features say instead of reshaping them from a random head's gradients; "
        "max_steps or more keeps the backbone fixed throughout",
    )
    other_tiles: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="share of training tiles without an abnormal cell that are kept: abnormal "
        "cells are rare, and reading tiles that teach nothing new dominates an epoch",
    )
    stream: StreamConfig = StreamConfig(readers=1, reader_cpus=0.5, planner_cpus=0.25)
    eval_batch_size: int = Field(default=32, ge=1)

    @model_validator(mode="after")
    def _known_version(self) -> DetectorConfig:
        if self.encoder_version != "latest":
            layout.model(self.encoder_model, self.encoder_version)  # validates the id
        return self

    @model_validator(mode="after")
    def _holdout_apart(self) -> DetectorConfig:
        overlap = set(self.holdout_batches) & set(self.batches)
        if overlap:
            raise ValueError(
                f"holdout_batches: {sorted(overlap)} also in batches; a held-out batch is never "
                "trained on"
            )
        return self


class DetectorResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    version: str
    step: int
    start_step: int
    loss: float
    report: DetectionReport
    holdout: DetectionReport | None = None
    holdout_calibrated: DetectionReport | None = None  # each held-out center's stain calibrated

    @property
    def map_abnormal(self) -> float:
        return abnormal_map(self.report)


# -- learner ------------------------------------------------------------------------------


def detector_card(cfg: DetectorConfig, encoder: ModelCard) -> ModelCard:
    """The card the finished detector will carry (also what rebuilds it on the workers)."""
    config = cfg.model_dump(mode="json", exclude={"store"})
    return ModelCard(
        name=cfg.model_name,
        architecture=encoder.architecture,
        task="detector",
        classes=list(DETECTION_CLASSES),
        head={"config": cfg.head.model_dump(mode="json"), "input_px": cfg.input_px},
        tiling=cfg.stream.tiling,
        normalization=encoder.normalization,
        training_config=config,
        training_config_sha256=config_sha256(config),
        synthetic=True,
    )


class DetectorLearner:
    """Detector, optimizer and loss of one run; the step the Ray Train loop repeats."""

    def __init__(
        self,
        cfg: DetectorConfig,
        device: torch.device,
        wrap: Any = lambda m, **_: m,
        *,
        encoder: ModelCard,
        encoder_state: dict[str, torch.Tensor] | None,
        labels: dict[SlideKey, SlideBoxes],
    ):
        self.cfg, self.device, self.wrap, self.labels = cfg, device, wrap, labels
        self.norm = encoder.normalization
        backbone = build_from(encoder.architecture)
        if encoder_state is not None:
            backbone.load_state_dict(encoder_state)
        self.raw = CellDetector(backbone, cfg.head, len(DETECTION_CLASSES))
        self.model: Any = self.raw
        backbone_params = list(self.raw.backbone.parameters())
        ids = {id(p) for p in backbone_params}
        head_params = [p for p in self.raw.parameters() if id(p) not in ids]
        self.params = backbone_params + head_params
        self.opt = torch.optim.AdamW(
            [
                {"params": params, "lr_scale": cfg.backbone_lr_scale * scale}
                for scale, params in layer_lr_scales(self.raw.backbone, cfg.layer_decay)
            ]
            + [{"params": head_params, "lr_scale": 1.0}],
            lr=cfg.optimizer.lr,
            weight_decay=cfg.optimizer.weight_decay,
        )
        self.amp = autocast_enabled(cfg, device)
        self.last_loss = float("nan")

    def prepare(self) -> None:
        # DDP must not wait for backbone gradients on the steps that compute none
        unused = {"find_unused_parameters": True} if self.cfg.freeze_backbone_steps else None
        self.model = self.wrap(self.raw, parallel_strategy_kwargs=unused)
        self.raw = getattr(self.model, "module", self.model)

    def state(self) -> dict[str, Any]:
        return {"model": self.raw.state_dict(), "optimizer": self.opt.state_dict()}

    def load(self, state: dict[str, Any]) -> None:
        self.raw.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])

    def loss(
        self,
        x: torch.Tensor,
        boxes: list[torch.Tensor],
        labels: list[torch.Tensor],
        backbone_grad: bool = True,
    ) -> torch.Tensor:
        cfg = self.cfg.loss
        logits, dist = self.model(x, backbone_grad)
        b, c, h, w = logits.shape
        centers = self.raw.centers(h, w, x.device)
        logits = logits.permute(0, 2, 3, 1).reshape(b, -1, c)
        dist = dist.permute(0, 2, 3, 1).reshape(b, -1, 4)
        cls_target = torch.zeros_like(logits)
        weight = torch.ones_like(logits)
        pred_boxes, gt_boxes, box_w = [], [], []
        for i in range(b):
            match = assign(centers, boxes[i], self.raw.stride, cfg.center_radius)
            pos = match >= 0
            cls = labels[i][match[pos]]
            w_pos = torch.where(cls < len(ABNORMAL_CLASSES), cfg.abnormal_weight, 1.0)
            cls_target[i, pos, cls] = 1.0
            weight[i, pos, cls] = w_pos
            pred_boxes.append(decode(centers[pos], dist[i, pos].float()))
            gt_boxes.append(boxes[i][match[pos]])
            box_w.append(w_pos)
        w_box = torch.cat(box_w)
        norm = max(1.0, float(w_box.sum()))
        focal = sigmoid_focal_loss(
            logits.float(), cls_target, cfg.focal_alpha, cfg.focal_gamma, reduction="none"
        )
        focal = (focal * weight).sum()
        pred, gt = torch.cat(pred_boxes), torch.cat(gt_boxes)
        if len(gt):
            giou = (generalized_box_iou_loss(pred, gt, reduction="none") * w_box).sum()
        else:
            giou = pred.sum()
        return (focal + cfg.box_weight * giou) / norm

    def train_batch(self, batch: dict[str, np.ndarray], step: int, gen: torch.Generator) -> int:
        imgs = resize_tiles(batch["image"], self.cfg.input_px)
        views, boxes, labels = [], [], []
        for i in range(len(imgs)):
            b, lab = batch_targets(self.labels, batch, i, self.cfg.input_px)
            img, bx = augment(imgs[i], torch.from_numpy(b), self.cfg.augment, gen)
            views.append(img)
            boxes.append(bx.to(self.device))
            labels.append(torch.from_numpy(lab).to(self.device))
        x = normalize(torch.stack(views), self.norm).to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss = self.loss(x, boxes, labels, step >= self.cfg.freeze_backbone_steps)
        self.last_loss = optimizer_step(self.opt, self.params, loss, step, self.cfg)
        return len(imgs)


def _encoder_weights(
    cfg: DetectorConfig, store: Store
) -> tuple[ModelCard, dict[str, torch.Tensor] | None]:
    if cfg.init == "pretrained":
        return load_model(store, cfg.encoder_model, cfg.encoder_version)
    return load_card(store, cfg.encoder_model, cfg.encoder_version), None


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: detector steps over this worker's shard of tiles."""
    cfg = DetectorConfig.model_validate(config)
    store = Store(cfg.store)
    encoder, state = _encoder_weights(cfg, store)
    labels = load_cell_labels(store, resolve_batches(store, cfg.batches))
    worker_loop(
        cfg,
        lambda device, wrap: DetectorLearner(
            cfg, device, wrap, encoder=encoder, encoder_state=state, labels=labels
        ),
    )


def _with_own_embedder(
    store: Store, cfg: DetectorConfig, card: ModelCard, encoder: ModelCard, model: CellDetector
) -> ModelCard:
    """A detector trained without pretraining embeds its cells with its own backbone.

    Screening embeds the top cells with a frozen encoder. Were that the pretrained encoder the
    architecture came from, a "no pretraining" arm would still classify slides on pretrained
    features. So the finetuned backbone is saved as an encoder of its own and the card names
    it as the embedder (``head.embedder``).
    """
    config = {"backbone_of": cfg.model_name, "init": "random", "run_name": cfg.run_name}
    backbone = encoder.model_copy(
        update={
            "name": f"{cfg.model_name}-backbone",
            "version": None,
            "training_config": config,
            "training_config_sha256": config_sha256(config),
            "metrics": {},
        }
    )
    version = save_model(store, backbone, model.backbone.state_dict())
    embedder = {"name": backbone.name, "version": version}
    log.info(
        "cells of %s will be embedded by its own backbone %s/%s", cfg.model_name, *embedder.values()
    )
    return card.model_copy(update={"head": card.head | {"embedder": embedder}})


def plan_detector(cfg: DetectorConfig) -> DetectorConfig:
    """The run with its batches pinned (``batches: []``: every annotated batch but the held-out
    ones) and its splits checked, from manifests alone: what the job checks before Ray starts."""
    refs = labelled_batches(Store(cfg.store), cfg.batches, exclude=cfg.holdout_batches)
    check_splits(refs, cfg.split, ("train", "test"), f"detector run {cfg.run_name!r}")
    return cfg.model_copy(update={"batches": batch_ids(refs)})


def finetune_detector(cfg: DetectorConfig) -> DetectorResult:
    """Train (or resume) the run, score the held-out slides, save the detector artifact."""
    store = Store(cfg.store)
    held = set(cfg.holdout_batches)  # never trained on, even when ``batches`` means "all"
    cfg = plan_detector(cfg)  # pinned: workers must not see a batch committed after this point
    refs = resolve_batches(store, cfg.batches)
    holdout_refs = resolve_batches(store, cfg.holdout_batches) if held else []
    labels = load_cell_labels(store, refs)
    holdout_labels = load_cell_labels(store, holdout_refs) if held else {}
    encoder = load_card(store, cfg.encoder_model, cfg.encoder_version)
    try:  # here, not in the first step of a worker after the tiles are read
        check_window(patch_size(encoder.architecture), cfg.head.window_px, *[cfg.input_px] * 2)
    except ValueError as e:
        raise CCSError(f"head.window_px / input_px against encoder {encoder.version}: {e}") from e
    cfg = cfg.model_copy(update={"encoder_version": encoder.version})
    splits = split_rows(refs, cfg.split)  # none empty: plan_detector checked
    if cfg.train_slides is not None:
        splits["train"] = label_budget(splits["train"], refs, cfg.train_slides, cfg.split.seed)
    log.info(
        "detector %s: %d training slides, %d held-out slides, backbone %s (%s %s)",
        cfg.run_name,
        len(splits["train"]),
        len(splits["test"]),
        cfg.init,
        cfg.encoder_model,
        encoder.version,
    )
    sampler = TileSampler(labels, cfg.other_tiles, cfg.seed)
    train_ds = tiles_dataset(splits["train"], store, cfg.stream, sampler)
    fitted = fit(cfg, train_loop, {"train": train_ds})
    card = detector_card(cfg, encoder)
    model = build_detector(card, fitted.state["model"])
    report = evaluate_detector(
        model, card, tiles_dataset(splits["test"], store, cfg.stream), labels, cfg.eval_batch_size
    )
    if cfg.init == "random":
        card = _with_own_embedder(store, cfg, card, encoder, model)
    reference = stain_reference(store.config, refs, cfg.stream)
    if reference is not None:  # the stain range it has seen, for calibrating new centers
        card = card.model_copy(update={"head": card.head | {REFERENCE_KEY: reference.model_dump()}})
    holdout = calibrated = None
    if held:
        holdout = score_batches(
            model, card, store, holdout_refs, holdout_labels, cfg.stream, cfg.eval_batch_size
        )
        log.info("held-out centers' mAP@0.5 (abnormal) %.3f: %s", abnormal_map(holdout), holdout.ap)
        stain = held_out_calibrations(card, store, holdout_refs, cfg.stream)
        if stain:
            calibrated = score_batches(
                model, card, store, holdout_refs, holdout_labels, cfg.stream,
                cfg.eval_batch_size, stain,
            )  # fmt: skip
            log.info(
                "held-out centers, stain-calibrated (%s): mAP@0.5 (abnormal) %.3f",
                ", ".join(sorted(stain)),
                abnormal_map(calibrated),
            )
    log.info("held-out mAP@0.5 (abnormal) %.3f: %s", abnormal_map(report), report.ap)
    card = card.model_copy(
        update={
            "data_manifest_sha256": manifests_sha256(store, refs),
            "metrics": report_metrics(report)
            | {"steps": float(fitted.state["step"])}
            | {f"holdout/{k}": v for k, v in report_metrics(holdout).items()}
            | {f"holdout_calibrated/{k}": v for k, v in report_metrics(calibrated).items()},
        }
    )
    version = save_model(store, card, model.state_dict())
    log.info("saved %s as %s", cfg.model_name, store.uri(layout.model(cfg.model_name, version)))
    return DetectorResult(
        version=version,
        step=int(fitted.state["step"]),
        start_step=int(fitted.metrics.get("start_step", 0)),
        loss=float(fitted.metrics.get("loss", float("nan"))),
        report=report,
        holdout=holdout,
        holdout_calibrated=calibrated,
    )
