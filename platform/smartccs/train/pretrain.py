"""Self-supervised pretraining of the tile encoder as a Ray Train job.

Tiles stream from committed batches through the Ray Data tile stream straight into the
training workers (no tile is written to disk), each worker cuts multi-crop views and takes a
DINO step. Checkpoints go to ``<store>/runs/<run name>/`` through Ray Train; re-running with the
same run name resumes from the newest one (Ray 2.60, Train V2: ``ray.train.get_checkpoint()``).
The teacher's backbone, the better encoder in DINO, is saved as ``models/encoder/<version>``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from smartccs import layout
from smartccs.batches import BatchRef, manifests_sha256, resolve_batches
from smartccs.data.tiles import (
    StreamConfig,
    TileShare,
    shuffled_slides,
    slide_rows,
    tile_stream,
)
from smartccs.errors import CCSError, StoreError
from smartccs.ids import Id
from smartccs.models.artifacts import (
    Architecture,
    ModelCard,
    config_sha256,
    load_card,
    load_model,
    require_model,
    save_model,
)
from smartccs.models.encoder import DEMO_ENCODER, build_from, embed_dim
from smartccs.models.refs import ModelRef
from smartccs.store import Store
from smartccs.train.dino import (
    DinoConfig,
    DINOHead,
    DINOLoss,
    IbotConfig,
    IBOTPatchLoss,
    MultiCropNet,
    ema_update,
    koleo_loss,
    make_teacher,
    patch_masks,
    teacher_momentum,
)
from smartccs.train.loop import (
    RunFields,
    autocast_enabled,
    fit,
    optimizer_step,
    worker_loop,
)
from smartccs.train.multicrop import MultiCropConfig, multi_crop
from smartccs.train.normalization import resolve_normalization

log = logging.getLogger(__name__)


class PretrainConfig(RunFields):
    """One pretraining run; the YAML under jobs/configs/ is this model."""

    batches: list[str] = Field(
        default_factory=list, description="'center/batch' pairs under incoming/; empty: all"
    )
    model_name: Id = "encoder"
    encoder: Architecture = DEMO_ENCODER
    init_from: str | None = Field(
        default=None,
        description="an encoder of the store ('name' or 'name/version', pinned at job start) "
        "that teacher and student start from, as the reference starts from Meta's DINOv2 "
        "(`ccs models import` brings one in): its card's architecture replaces `encoder`, and "
        "with crops.normalization 'auto' its normalisation is the run's",
    )
    crops: MultiCropConfig = MultiCropConfig()
    dino: DinoConfig = DinoConfig()
    ibot: IbotConfig = Field(
        default=IbotConfig(),
        description="iBOT masked patch prediction beside DINO (trains the patch tokens the "
        "detector reads); weight 0 = off",
    )
    stream: StreamConfig = StreamConfig(readers=1, reader_cpus=0.5, planner_cpus=0.25)
    normalization_tiles: int = Field(
        default=256, ge=1, description="tiles to estimate crops.normalization from when 'auto'"
    )
    tile_share: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="share of every slide's tiles read (a fixed, seeded subset): set it so "
        "that an epoch is about max_steps x batch_size x workers tiles, and a short run "
        "learns from every slide and center instead of the first ones it reads",
    )

    @model_validator(mode="after")
    def _crops_fit_encoder(self) -> PretrainConfig:
        # with init_from, `encoder` is replaced by that encoder's when the run is planned,
        # and the crops are checked against it there
        if self.init_from is None and (why := _crops_misfit(self.crops, self.encoder)):
            raise ValueError(why)
        return self


def _crops_misfit(crops: MultiCropConfig, encoder: Architecture) -> str | None:
    img = encoder.kwargs.get("img_size")
    if img is not None and img != crops.global_size:
        return f"crops.global_size {crops.global_size} must equal the encoder's img_size {img}"
    return None


class PretrainResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    version: str
    start_step: int
    step: int
    loss: float
    run_path: str


def _build(cfg: PretrainConfig, init: bool = True) -> tuple[MultiCropNet, MultiCropNet]:
    backbone = build_from(cfg.encoder)
    if init and cfg.init_from:  # the teacher is a copy of the student: both start from these
        ref = ModelRef.parse(cfg.init_from)
        _, state = load_model(Store(cfg.store), ref.name, ref.version or "latest")
        backbone.load_state_dict(state, strict=True)
    head = DINOHead(embed_dim(backbone), cfg.dino)
    student = MultiCropNet(backbone, head, mask_token=cfg.ibot.enabled)
    return student, make_teacher(student)


class Learner:
    """Student, teacher, loss and optimizer of one DINO run, and the step that moves them.

    The Ray Train loop and ``bench/pretrain_throughput.py`` run this same step, so the bench
    measures what the job does.
    """

    def __init__(
        self, cfg: PretrainConfig, device: torch.device, wrap: Callable[[Any], Any] = lambda m: m
    ):
        self.cfg = cfg
        self.device = device
        student, self.teacher = _build(cfg)
        self.loss_fn = DINOLoss(cfg.dino)
        self.ibot_loss = (
            IBOTPatchLoss(cfg.ibot, cfg.dino.out_dim, cfg.dino.student_temp)
            if cfg.ibot.enabled
            else None
        )
        self.params = [p for p in student.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(
            self.params, lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay
        )
        self.raw_student = student
        self.student = student  # wrapped (DDP) by prepare() once the state is loaded
        self.wrap = wrap
        self.amp = autocast_enabled(cfg, device)
        self.last_loss = float("nan")
        self.last_terms: dict[str, float] = {}
        """The last step's loss terms before weighting ('dino', and 'ibot' when on)."""

    def prepare(self) -> None:
        """Move to the device (and wrap for data parallelism) after any checkpoint is loaded."""
        self.student = self.wrap(self.raw_student)
        self.raw_student = getattr(self.student, "module", self.student)
        self.teacher.to(self.device)
        self.loss_fn.to(self.device)
        if self.ibot_loss is not None:
            self.ibot_loss.to(self.device)

    def state(self) -> dict[str, Any]:
        state = {
            "student": self.raw_student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.opt.state_dict(),
            "loss": self.loss_fn.state_dict(),
        }
        if self.ibot_loss is not None:
            state["ibot_loss"] = self.ibot_loss.state_dict()
        return state

    def load(self, state: dict[str, Any]) -> None:
        self.raw_student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.opt.load_state_dict(state["optimizer"])
        self.loss_fn.load_state_dict(state["loss"])
        if self.ibot_loss is not None:
            self.ibot_loss.load_state_dict(state["ibot_loss"])

    def step(self, images: np.ndarray, step: int, gen: torch.Generator) -> float:
        """One DINO step on a batch of uint8 tiles; returns the loss."""
        cfg = self.cfg
        tiles = torch.from_numpy(images).to(self.device, non_blocking=True)
        views = multi_crop(tiles, cfg.crops, gen)
        masks = None
        if self.ibot_loss is not None:
            patch = self.raw_student.patch_size
            grid = (views[0].shape[-2] // patch) * (views[0].shape[-1] // patch)
            masks = [patch_masks(len(v), grid, cfg.ibot, gen) for v in views[:2]]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            with torch.no_grad():
                teacher_out = self.teacher(views[:2], patches=masks is not None)
            loss = self.loss_fn(self.student(views, masks=masks), teacher_out, step)
            terms = {"dino": loss}
            if self.ibot_loss is not None and masks is not None:
                s_patches, t_patches = self.raw_student.patch_outputs, self.teacher.patch_outputs
                assert s_patches is not None and t_patches is not None
                terms["ibot"] = self.ibot_loss(s_patches, t_patches, masks)
                loss = loss + cfg.ibot.weight * terms["ibot"]
                # the mask token takes part in every step, masked or not (DDP wants every
                # parameter in the graph)
                token = self.raw_student.mask_token
                assert token is not None
                loss = loss + 0.0 * token.sum()
            if cfg.dino.koleo_weight:
                feats = self.raw_student.global_features
                assert feats is not None
                loss = loss + cfg.dino.koleo_weight * sum(koleo_loss(f) for f in feats.chunk(2)) / 2
        self.last_loss = optimizer_step(self.opt, self.params, loss, step, cfg)
        self.last_terms = {k: float(v.detach()) for k, v in terms.items()}
        ema_update(self.raw_student, self.teacher, teacher_momentum(step, cfg.max_steps, cfg.dino))
        return self.last_loss

    def train_batch(self, batch: dict[str, np.ndarray], step: int, gen: torch.Generator) -> int:
        self.step(batch["image"], step, gen)
        return len(batch["image"])


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: DINO steps over this worker's shard of the tiles."""
    cfg = PretrainConfig.model_validate(config)
    worker_loop(cfg, lambda device, wrap: Learner(cfg, device, wrap))


def training_dataset(store: Store, cfg: PretrainConfig, refs: list[BatchRef]):
    """The tile stream of these batches, slides in seeded random order (centers mixed):
    readable tiles only, pixels only."""
    rows = shuffled_slides(slide_rows(refs), cfg.seed)
    select = TileShare(cfg.tile_share, cfg.seed) if cfg.tile_share < 1 else None
    return tile_stream(rows, store.config, cfg.stream, select, readable_only=True,
                       columns=("image",))  # fmt: skip


def plan_pretrain(cfg: PretrainConfig) -> PretrainConfig:
    """The run as given, once its batches resolve (each named one committed, or with none named
    at least one committed batch) and the encoder it starts from is pinned: what the job checks
    before Ray starts."""
    store = Store(cfg.store)
    resolve_batches(store, cfg.batches)
    return _pin_init(store, cfg) if cfg.init_from else cfg


def _pin_init(store: Store, cfg: PretrainConfig) -> PretrainConfig:
    """``init_from`` pinned to its version, with that encoder's architecture (and, when the
    run's is 'auto', normalisation): continuing a network means feeding it what it knows."""
    assert cfg.init_from is not None
    ref = ModelRef.parse(cfg.init_from)
    try:
        card = require_model(store, ref.name, ref.version or "latest", "encoder")
    except StoreError as exc:
        raise CCSError(
            f"{cfg.run_name}: init_from: {exc}. Bring a published encoder in first: ccs models "
            f"import --store {store.uri()} --encoder FILE --encoder-kind KIND (docs/models.md)"
        ) from None
    # local views are smaller than global ones: the ViT must take both sizes (its weights are
    # the same either way; at the card's own size nothing is resampled)
    kwargs = card.architecture.kwargs | {"dynamic_img_size": True}
    update: dict[str, Any] = {
        "init_from": f"{card.name}/{card.version}",
        "encoder": card.architecture.model_copy(update={"kwargs": kwargs}),
    }
    if cfg.crops.normalization == "auto":
        update["crops"] = cfg.crops.model_copy(update={"normalization": card.normalization})
    log.info("%s starts from encoder %s (%s)", cfg.run_name, update["init_from"],
             card.architecture.timm_name)  # fmt: skip
    planned = cfg.model_copy(update=update)
    if why := _crops_misfit(planned.crops, planned.encoder):
        raise CCSError(f"{cfg.run_name}: init_from {planned.init_from}: {why}")
    return planned


def _lineage(store: Store, cfg: PretrainConfig) -> dict[str, Any]:
    """What an encoder continued from another keeps of it on its card: where it started, how
    its embedding is taken and the crops it was made for (so ``load_encoder`` loads it too)."""
    if not cfg.init_from:
        return {}
    ref = ModelRef.parse(cfg.init_from)
    source = load_card(store, ref.name, ref.version or "latest")
    kept = {k: source.head[k] for k in ("embedding", "embed_dim", "crop") if k in source.head}
    return kept | {"init_from": {"name": source.name, "version": source.version}}


def pretrain(cfg: PretrainConfig) -> PretrainResult:
    """Train (or resume) the run, then save the teacher encoder as a model artifact."""
    store = Store(cfg.store)
    refs = resolve_batches(store, cfg.batches)
    if cfg.init_from:
        cfg = _pin_init(store, cfg)  # as the job's check does; kept as pinned
    ds = training_dataset(store, cfg, refs)
    if cfg.crops.normalization == "auto":
        norm = resolve_normalization(store, cfg.run_name, ds, cfg.normalization_tiles)
        cfg = cfg.model_copy(update={"crops": cfg.crops.model_copy(update={"normalization": norm})})
    fitted = fit(cfg, train_loop, {"train": ds})
    state, metrics = fitted.state, fitted.metrics
    loss = float(metrics.get("loss", float("nan")))
    _, teacher = _build(cfg, init=False)
    teacher.load_state_dict(state["teacher"])
    config = cfg.model_dump(mode="json", exclude={"store"})
    card = ModelCard(
        name=cfg.model_name,
        architecture=cfg.encoder,
        task="encoder",
        head=_lineage(store, cfg),
        tiling=cfg.stream.tiling,
        normalization=cfg.crops.normalization,
        training_config=config,
        training_config_sha256=config_sha256(config),
        data_manifest_sha256=manifests_sha256(store, refs),
        # a run resumed at its last step takes no step and has no loss to report
        metrics={"steps": state["step"]} | ({"dino_loss": loss} if math.isfinite(loss) else {}),
        synthetic=True,
    )
    version = save_model(store, card, teacher.backbone.state_dict())
    log.info("saved %s as %s", cfg.model_name, store.uri(layout.model(cfg.model_name, version)))
    return PretrainResult(
        version=version,
        start_step=int(metrics.get("start_step", 0)),
        step=int(state["step"]),
        loss=float(metrics.get("loss", float("nan"))),
        run_path=store.uri("runs", cfg.run_name),
    )
