"""Finetuning the abnormal-cell detector on annotated cell boxes, as a Ray Train job.

Tiles of the training slides stream from the store through the same tile stream as screening;
each worker looks up the annotated cells that fall on its tiles (``labels/``), augments tile
and boxes together (the 8 square symmetries, stain and exposure jitter) and takes a step of
focal plus GIoU loss. The backbone starts from the pretrained encoder, or from random weights
of the same architecture for the ablation. The held-out slides' tiles are then scored (AP at
IoU 0.5 per class) and the detector is saved as ``models/<model_name>/<version>``.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss
from tqdm.auto import tqdm

from smartccs import layout
from smartccs.adaptation.stain import (
    REFERENCE_KEY,
    center_calibration,
    measure_stain,
    stain_reference,
)
from smartccs.batches import BatchRef, manifests_sha256, resolve_batches
from smartccs.data.tiles import STATUS_OK, StreamConfig, slide_rows, tile_draw, tile_stream
from smartccs.errors import CCSError
from smartccs.ids import Id
from smartccs.labels import SlideBoxes, SlideKey, load_cell_labels
from smartccs.metrics.detection import Boxes, DetectionReport, detection_report
from smartccs.models.artifacts import ModelCard, config_sha256, load_card, load_model, save_model
from smartccs.models.detector import (
    DETECTION_CLASSES,
    CellDetector,
    HeadConfig,
    build_detector,
    decode,
    detection_class,
    normalize,
    preprocess,
    resize_tiles,
)
from smartccs.models.encoder import build_from, check_window, layer_lr_scales, patch_size
from smartccs.splits import SplitConfig, split_rows
from smartccs.stain import StainCalibration, calibrate
from smartccs.store import Store
from smartccs.taxonomy import ABNORMAL_CLASSES
from smartccs.train.loop import RunFields, autocast_enabled, fit, optimizer_step, worker_loop
from smartccs.train.multicrop import brightness_contrast, gaussian_blur, stain_jitter

log = logging.getLogger(__name__)

TILE_COLUMNS = ["image", "center", "batch", "slide_id", "x0", "y0", "w0", "h0"]


class AugmentConfig(BaseModel):
    """Tile and box augmentation: orientation, and the stain/exposure shifts between centers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    color_p: float = Field(default=0.8, ge=0, le=1)
    stain_sigma: float = Field(default=0.1, ge=0)
    stain_bias: float = Field(default=0.05, ge=0)
    brightness: float = Field(default=0.15, ge=0, lt=1)
    contrast: float = Field(default=0.15, ge=0, lt=1)
    hue_deg: float = Field(
        default=0.0, ge=0, le=180, description="stain hue rotation in OD, up to ± this angle"
    )
    blur_p: float = Field(default=0.0, ge=0, le=1, description="chance of a focus blur")
    blur_sigma_px: tuple[float, float] = Field(
        default=(0.5, 2.0), description="blur sigma range, pixels of the input tile"
    )

    @field_validator("blur_sigma_px")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"blur_sigma_px must be 0 < low <= high, got {list(v)}")
        return v


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
        default_factory=list, description="annotated 'center/batch' pairs; empty: all committed"
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


def abnormal_map(report: DetectionReport) -> float:
    """mAP over the six Bethesda classes that have ground truth (normal squamous left out)."""
    aps = [report.ap[c] for c in ABNORMAL_CLASSES if not np.isnan(report.ap.get(c, np.nan))]
    return float(np.mean(aps)) if aps else float("nan")


def abnormal_ap_by_cells(ap: dict[str, float], n_gt: dict[str, int]) -> float:
    """Per-class AP over the abnormal classes, weighted by their held-out cells.

    Beside :func:`abnormal_map`, where each class counts once: on a handful of slides a class
    with 3 held-out cells weighs as much as one with 118 there, and one cell ranked differently
    moves the mean by a tenth.
    """
    pairs = [(ap[c], n_gt.get(c, 0)) for c in ABNORMAL_CLASSES if n_gt.get(c, 0) > 0]
    pairs = [(a, n) for a, n in pairs if not np.isnan(a)]
    total = sum(n for _, n in pairs)
    return float(sum(a * n for a, n in pairs) / total) if total else float("nan")


# -- targets ------------------------------------------------------------------------------


def box_centres(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) xyxy -> (N, 2) centres."""
    return np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)


def centred_on(centres: np.ndarray, x0: int, y0: int, w0: int, h0: int) -> np.ndarray:
    """Which cells belong to a tile: those whose centre lies in its region (each cell to one)."""
    x, y = centres[:, 0], centres[:, 1]
    return (x >= x0) & (x < x0 + w0) & (y >= y0) & (y < y0 + h0)


def tile_targets(
    cells: SlideBoxes, x0: int, y0: int, w0: int, h0: int, input_px: int
) -> tuple[np.ndarray, np.ndarray]:
    """Annotated cells whose centre lies on the tile, in the tile's input pixels, and classes.

    Cells cut by the tile's edge are clipped to it: their centre is on the tile, so the
    detector sees most of them, and the neighbouring tile does not count them again.
    """
    if not len(cells):
        return np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    on = centred_on(box_centres(cells.boxes), x0, y0, w0, h0)
    labels = np.array([detection_class(c) for c in cells.classes[on]], dtype=object)
    known = np.array([lab is not None for lab in labels], dtype=bool)
    boxes = cells.boxes[on][known] - np.array([x0, y0, x0, y0], np.float64)
    scale = np.array([input_px / w0, input_px / h0] * 2)
    boxes = np.clip(boxes * scale, 0, input_px).astype(np.float32)
    return boxes, labels[known].astype(np.int64)


def batch_targets(
    labels: dict[SlideKey, SlideBoxes], batch: dict[str, np.ndarray], i: int, input_px: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`tile_targets` of row ``i`` of a batch of tile rows."""
    key = (str(batch["center"][i]), str(batch["batch"][i]), str(batch["slide_id"][i]))
    cells = labels.get(key)
    if cells is None:
        raise CCSError(f"no annotations for {'/'.join(key)}")
    x0, y0, w0, h0 = (int(batch[c][i]) for c in ("x0", "y0", "w0", "h0"))
    return tile_targets(cells, x0, y0, w0, h0, input_px)


def assign(
    centers: torch.Tensor, boxes: torch.Tensor, stride: float, radius: float
) -> torch.Tensor:
    """Index of the box each location learns (-1: background), FCOS with centre sampling.

    A location is a positive of a box when it lies inside the box and within ``radius``
    strides of its centre; of several such boxes it takes the smallest.
    """
    if len(boxes) == 0:
        return torch.full((len(centers),), -1, dtype=torch.long)
    x, y = centers[:, None, 0], centers[:, None, 1]
    inside = (x > boxes[:, 0]) & (x < boxes[:, 2]) & (y > boxes[:, 1]) & (y < boxes[:, 3])
    bcx, bcy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    near = ((x - bcx).abs() <= radius * stride) & ((y - bcy).abs() <= radius * stride)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    cost = torch.where(inside & near, area.expand_as(inside), torch.inf)
    best, idx = cost.min(dim=1)
    return torch.where(torch.isfinite(best), idx, -1)


# -- augmentation -------------------------------------------------------------------------


def flip_rotate_boxes(
    img: torch.Tensor, boxes: torch.Tensor, k: int, flip: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror (left-right) then rotate by k x 90 degrees counter-clockwise, image and boxes."""
    size = img.shape[-1]
    if flip:
        img = img.flip(-1)
        boxes = torch.stack([size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]], 1)
    for _ in range(k % 4):
        img = torch.rot90(img, 1, dims=(-2, -1))  # (x, y) -> (y, size - x)
        boxes = torch.stack([boxes[:, 1], size - boxes[:, 2], boxes[:, 3], size - boxes[:, 0]], 1)
    return img, boxes


def augment(
    img: torch.Tensor, boxes: torch.Tensor, cfg: AugmentConfig, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random view of a [0, 1] tile (3, S, S) and its boxes."""
    k = int(torch.randint(0, 4, (1,), generator=g))
    flip = bool(torch.rand(1, generator=g) < 0.5)
    img, boxes = flip_rotate_boxes(img, boxes, k, flip)
    if bool(torch.rand(1, generator=g) < cfg.color_p):
        img = stain_jitter(img, g, cfg.stain_sigma, cfg.stain_bias, cfg.hue_deg)
        img = brightness_contrast(img, g, cfg.brightness, cfg.contrast)
    if cfg.blur_p > 0 and bool(torch.rand(1, generator=g) < cfg.blur_p):
        lo, hi = cfg.blur_sigma_px
        img = gaussian_blur(img, lo + (hi - lo) * float(torch.rand(1, generator=g)))
    return img, boxes


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


# -- data and evaluation ------------------------------------------------------------------


def _ok_tiles(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    keep = batch["status"] == STATUS_OK
    return {c: batch[c][keep] for c in TILE_COLUMNS}


class TileSampler:
    """Keeps every tile holding an annotated abnormal cell and a fixed share of the others.

    The share is drawn from a hash of the tile's identity, so resumed runs and every epoch
    see the same tiles, and the choice is made on planned coordinates, before pixels are read.
    """

    def __init__(self, labels: dict[SlideKey, SlideBoxes], other_share: float, seed: int):
        self.other_share, self.seed = other_share, seed
        self.centers: dict[SlideKey, np.ndarray] = {}
        for key, cells in labels.items():
            self.centers[key] = box_centres(cells.boxes[np.isin(cells.classes, ABNORMAL_CLASSES)])

    def __call__(self, row: dict[str, Any]) -> bool:
        key = (str(row["center"]), str(row["batch"]), str(row["slide_id"]))
        c = self.centers.get(key)
        x0, y0, w0, h0 = (int(row[k]) for k in ("x0", "y0", "w0", "h0"))
        if c is not None and centred_on(c, x0, y0, w0, h0).any():
            return True
        return tile_draw(row, self.seed) < self.other_share


def tiles_dataset(
    rows: list[dict[str, Any]],
    store: Store,
    stream: StreamConfig,
    select: TileSampler | None = None,
):
    """Readable tiles of these slides with their coordinates (what the targets need)."""
    return tile_stream(rows, store.config, stream, select=select).map_batches(
        _ok_tiles, batch_format="numpy", num_cpus=0.1
    )


def evaluate_detector(
    model: CellDetector,
    card: ModelCard,
    ds,
    labels: dict[SlideKey, SlideBoxes],
    batch_size: int,
    n_tiles: int | None = None,
    stain: dict[str, StainCalibration] | None = None,
) -> DetectionReport:
    """AP at IoU 0.5 per class over held-out tiles (each tile an image); ``stain``: per
    center, the calibration its tiles are seen through (what adaptation would apply)."""
    input_px = int(card.head["input_px"])
    model.eval()
    pred: dict[str, list] = defaultdict(list)
    gt: dict[str, list] = defaultdict(list)
    image = 0
    with tqdm(desc="scoring held-out tiles", unit="tile", total=n_tiles, disable=None) as bar:
        for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
            images = batch["image"]
            for center, cal in (stain or {}).items():
                here = batch["center"] == center
                if here.any():
                    images = images.copy() if images is batch["image"] else images
                    images[here] = calibrate(images[here], cal)
            x = preprocess(images, input_px, card.normalization)
            for i, det in enumerate(model.detect(x)):
                boxes, classes = batch_targets(labels, batch, i, input_px)
                pred["image_ids"].append(np.full(len(det.scores), image))
                pred["boxes"].append(det.boxes.numpy())
                pred["scores"].append(det.scores.numpy())
                pred["labels"].append(det.labels.numpy())
                gt["image_ids"].append(np.full(len(classes), image))
                gt["boxes"].append(boxes)
                gt["labels"].append(classes)
                image += 1
            bar.update(len(batch["image"]))
    if image == 0:
        raise CCSError("no held-out tiles to evaluate the detector on")
    return detection_report(
        Boxes(**{k: np.concatenate(v) for k, v in pred.items()}),
        Boxes(**{k: np.concatenate(v) for k, v in gt.items()}),
        DETECTION_CLASSES,
        iou_threshold=0.5,
    )


def _budget_rank(row: dict[str, Any], seed: int) -> bytes:
    key = f"budget:{seed}:{row['center']}:{row['batch']}:{row['slide_id']}"
    return hashlib.sha256(key.encode()).digest()


def label_budget(
    rows: list[dict[str, Any]], refs: list[BatchRef], n: int, seed: int
) -> list[dict[str, Any]]:
    """The first ``n`` of these training slides, for a label-budget ablation.

    Slides are ordered within each stratum (center x normal/abnormal) by a hash of their
    identity and the split seed, and the strata are taken in turn, abnormal ones first (they
    hold the cells the detector is for), so a budget of one slide per center gives each
    center an abnormal slide; a larger budget always contains a smaller one.
    """
    grades = {(r.center, r.batch, s.slide_id): s.grade for r in refs for s in r.manifest.slides}
    strata: dict[tuple[str, bool], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        key = (row["center"], row["batch"], row["slide_id"])
        strata[(row["center"], (grades.get(key) or "NILM") != "NILM")].append(row)
    queues = []
    for stratum in sorted(strata, key=lambda k: (not k[1], k[0])):  # abnormal first, by center
        members = strata[stratum]
        members.sort(key=lambda r: _budget_rank(r, seed))
        queues.append(members)
    out: list[dict[str, Any]] = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


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


def finetune_detector(cfg: DetectorConfig) -> DetectorResult:
    """Train (or resume) the run, score the held-out slides, save the detector artifact."""
    store = Store(cfg.store)
    held = set(cfg.holdout_batches)  # never trained on, even when ``batches`` means "all"
    refs = [r for r in resolve_batches(store, cfg.batches) if f"{r.center}/{r.batch}" not in held]
    holdout_refs = resolve_batches(store, cfg.holdout_batches) if held else []
    labels = load_cell_labels(store, refs)  # fails early, naming a batch without annotations
    holdout_labels = load_cell_labels(store, holdout_refs) if held else {}
    encoder = load_card(store, cfg.encoder_model, cfg.encoder_version)
    try:  # here, not in the first step of a worker after the tiles are read
        check_window(patch_size(encoder.architecture), cfg.head.window_px, *[cfg.input_px] * 2)
    except ValueError as e:
        raise CCSError(f"head.window_px / input_px against encoder {encoder.version}: {e}") from e
    # pin what the driver resolved: workers must not see a batch committed after this point
    cfg = cfg.model_copy(
        update={
            "encoder_version": encoder.version,
            "batches": [f"{r.center}/{r.batch}" for r in refs],
        }
    )
    splits = split_rows(refs, cfg.split)
    if cfg.train_slides is not None:
        splits["train"] = label_budget(splits["train"], refs, cfg.train_slides, cfg.split.seed)
    if not splits["train"] or not splits["test"]:
        raise CCSError(
            f"need slides in both train and test splits, got {len(splits['train'])} and "
            f"{len(splits['test'])}: add slides or change split fractions"
        )
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
    model = build_detector(card)
    model.load_state_dict(fitted.state["model"])
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
        holdout = _score_batches(
            model, card, store, holdout_refs, holdout_labels, cfg.stream, cfg.eval_batch_size
        )
        log.info("held-out centers' mAP@0.5 (abnormal) %.3f: %s", abnormal_map(holdout), holdout.ap)
        stain = held_out_calibrations(card, store, holdout_refs, cfg.stream)
        if stain:
            calibrated = _score_batches(
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


def report_metrics(report: DetectionReport | None) -> dict[str, float]:
    """A report as card metrics: per-class AP, mAP, the abnormal summaries; finite values only
    (a class without ground truth has none)."""
    if report is None:
        return {}
    summaries = {
        "map50_abnormal": abnormal_map(report),
        "ap50_abnormal_by_cells": abnormal_ap_by_cells(report.ap, report.n_gt),
    }
    return report.to_metrics() | {k: v for k, v in summaries.items() if not np.isnan(v)}


def _score_batches(
    model: CellDetector,
    card: ModelCard,
    store: Store,
    refs: list[BatchRef],
    labels: dict[SlideKey, SlideBoxes],
    stream: StreamConfig,
    batch_size: int,
    stain: dict[str, StainCalibration] | None = None,
) -> DetectionReport:
    """Every tile of every slide of these batches, scored against their annotations."""
    ds = tiles_dataset(slide_rows(refs), store, stream)
    return evaluate_detector(model, card, ds, labels, batch_size, stain=stain)


def held_out_calibrations(
    card: ModelCard, store: Store, refs: list[BatchRef], stream: StreamConfig
) -> dict[str, StainCalibration]:
    """Per center of these batches, the stain calibration adaptation would give it (measured
    on all of the center's batches at once); centers inside the training range are absent."""
    by_center: dict[str, list[BatchRef]] = {}
    for ref in refs:
        by_center.setdefault(ref.center, []).append(ref)
    out = {}
    for center, center_refs in by_center.items():
        stats = measure_stain(store.config, slide_rows(center_refs), stream, 64)
        cal = center_calibration(card, stats)
        if cal is not None:
            out[center] = cal
    return out


def score_detector(
    store: Store,
    name: str,
    version: str,
    batches: list[str],
    stream: StreamConfig,
    batch_size: int = 32,
    calibrate_stain: bool = False,
) -> DetectionReport:
    """AP at IoU 0.5 of a saved detector on annotated batches, every tile of every slide
    (with ``calibrate_stain``, each center seen through its stain calibration).

    For detectors trained before a center's annotations existed, or to compare saved arms on
    one more center without retraining them.
    """
    card, state = load_model(store, name, version)
    model = build_detector(card)
    model.load_state_dict(state)
    refs = resolve_batches(store, batches)
    labels = load_cell_labels(store, refs)
    stain = held_out_calibrations(card, store, refs, stream) if calibrate_stain else None
    return _score_batches(model, card, store, refs, labels, stream, batch_size, stain)
