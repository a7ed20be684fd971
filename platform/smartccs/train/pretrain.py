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
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from smartccs import layout
from smartccs.batches import CommitRecord, list_batches, load_batch
from smartccs.commits import read_commit
from smartccs.data.tiles import STATUS_OK, StreamConfig, slide_rows, tile_stream
from smartccs.errors import CCSError
from smartccs.ids import Id
from smartccs.models.artifacts import (
    Architecture,
    ModelCard,
    config_sha256,
    data_sha256,
    save_model,
)
from smartccs.models.encoder import DEMO_ENCODER, build_from, embed_dim
from smartccs.store import Store, StoreConfig
from smartccs.train.dino import (
    DinoConfig,
    DINOHead,
    DINOLoss,
    MultiCropNet,
    ema_update,
    make_teacher,
    teacher_momentum,
)
from smartccs.train.multicrop import MultiCropConfig, multi_crop
from smartccs.train.normalization import resolve_normalization

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"


class OptimizerConfig(BaseModel):
    """AdamW with linear warm-up then cosine decay, per optimizer step."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lr: float = Field(default=5e-4, gt=0)
    min_lr: float = Field(default=1e-6, ge=0)
    weight_decay: float = Field(default=0.04, ge=0)
    warmup_steps: int = Field(default=10, ge=0)
    clip_grad: float = Field(default=3.0, ge=0, description="0 disables clipping")


class ScalingFields(BaseModel):
    """Ray Train workers. On a 2-core machine give them fractional CPUs or Ray Data starves."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=0.5, gt=0)
    gpus_per_worker: float = Field(default=1.0, ge=0, description="only with use_gpu")
    mixed_precision: bool = Field(default=True, description="bfloat16 autocast, GPU only")


class PretrainConfig(BaseModel):
    """One pretraining run; the YAML under jobs/configs/ is this model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_name: Id = Field(description="re-running with the same name resumes this run")
    store: StoreConfig = Field(default_factory=StoreConfig.from_env)
    batches: list[str] = Field(
        default_factory=list, description="'center/batch' pairs under incoming/; empty: all"
    )
    model_name: Id = "encoder"
    encoder: Architecture = DEMO_ENCODER
    crops: MultiCropConfig = MultiCropConfig()
    dino: DinoConfig = DinoConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    stream: StreamConfig = StreamConfig(readers=1, reader_cpus=0.5, planner_cpus=0.25)
    scaling: ScalingFields = ScalingFields()
    batch_size: int = Field(default=16, ge=1, description="tiles per step per worker")
    max_steps: int = Field(default=100, ge=1, description="optimizer steps; schedules span it")
    max_epochs: int = Field(default=100, ge=1, description="passes over the tiles, at most")
    checkpoint_every: int = Field(default=20, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(default=2, ge=1)
    max_failures: int = Field(default=2, ge=0, description="worker failures survived")
    log_every: int = Field(default=1, ge=1)
    normalization_tiles: int = Field(
        default=256, ge=1, description="tiles to estimate crops.normalization from when 'auto'"
    )
    seed: int = 0

    @model_validator(mode="after")
    def _crops_fit_encoder(self) -> PretrainConfig:
        img = self.encoder.kwargs.get("img_size")
        if img is not None and img != self.crops.global_size:
            raise ValueError(
                f"crops.global_size {self.crops.global_size} must equal the encoder's img_size "
                f"{img}"
            )
        return self


class PretrainResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    version: str
    start_step: int
    step: int
    loss: float
    run_path: str


def _lr_at(step: int, cfg: PretrainConfig) -> float:
    o = cfg.optimizer
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    frac = (step - o.warmup_steps) / max(1, cfg.max_steps - o.warmup_steps)
    return o.min_lr + (o.lr - o.min_lr) * (1 + math.cos(math.pi * min(1.0, frac))) / 2


def _build(cfg: PretrainConfig) -> tuple[MultiCropNet, MultiCropNet]:
    backbone = build_from(cfg.encoder)
    student = MultiCropNet(backbone, DINOHead(embed_dim(backbone), cfg.dino))
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
        self.params = [p for p in student.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(
            self.params, lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay
        )
        self.raw_student = student
        self.student = student  # wrapped (DDP) by prepare() once the state is loaded
        self.wrap = wrap
        self.amp = cfg.scaling.use_gpu and cfg.scaling.mixed_precision and device.type == "cuda"

    def prepare(self) -> None:
        """Move to the device (and wrap for data parallelism) after any checkpoint is loaded."""
        self.student = self.wrap(self.raw_student)
        self.raw_student = getattr(self.student, "module", self.student)
        self.teacher.to(self.device)
        self.loss_fn.to(self.device)

    def state(self) -> dict[str, Any]:
        return {
            "student": self.raw_student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.opt.state_dict(),
            "loss": self.loss_fn.state_dict(),
        }

    def load(self, state: dict[str, Any]) -> None:
        self.raw_student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.opt.load_state_dict(state["optimizer"])
        self.loss_fn.load_state_dict(state["loss"])

    def step(self, images: np.ndarray, step: int, gen: torch.Generator) -> float:
        """One DINO step on a batch of uint8 tiles; returns the loss."""
        cfg = self.cfg
        views = [v.to(self.device, non_blocking=True) for v in multi_crop(images, cfg.crops, gen)]
        for group in self.opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            with torch.no_grad():
                teacher_out = self.teacher(views[:2])
            loss = self.loss_fn(self.student(views), teacher_out, step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optimizer.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.optimizer.clip_grad)
        self.opt.step()
        ema_update(self.raw_student, self.teacher, teacher_momentum(step, cfg.max_steps, cfg.dino))
        value = float(loss.detach())
        if not np.isfinite(value):
            raise FloatingPointError(f"step {step + 1}: loss is {value}")
        return value


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: DINO steps over this worker's shard of the tiles."""
    import ray.train
    import ray.train.torch

    from smartccs.logs import configure_logging

    configure_logging(1)
    cfg = PretrainConfig.model_validate(config)
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(cfg.seed)  # same init on every worker; DDP broadcasts it anyway
    learner = Learner(cfg, ray.train.torch.get_device(), wrap=ray.train.torch.prepare_model)
    step = epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
        learner.load(state)
        step, epoch = int(state["step"]), int(state["epoch"])
        log.info("resumed %s at step %d (epoch %d)", cfg.run_name, step, epoch)
    start_step = step
    learner.prepare()
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank * 100_003 + step)
    shard = ray.train.get_dataset_shard("train")
    loss_value, tiles_seen, t0 = float("nan"), 0, time.monotonic()

    def report(with_checkpoint: bool) -> None:
        metrics = {
            "step": step,
            "epoch": epoch,
            "start_step": start_step,
            "loss": loss_value,
            "tiles_per_s": tiles_seen / max(1e-9, time.monotonic() - t0),
        }
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                state = learner.state() | {"step": step, "epoch": epoch}
                torch.save(state, Path(d) / STATE_FILE)
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)

    last_checkpoint = step
    while step < cfg.max_steps and epoch < cfg.max_epochs:
        for batch in shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy"):
            images = batch["image"]
            loss_value = learner.step(images, step, gen)
            step += 1
            tiles_seen += len(images)
            if rank == 0 and step % cfg.log_every == 0:
                rate = tiles_seen / max(1e-9, time.monotonic() - t0)
                log.info("step %d epoch %d loss %.4f %.1f tiles/s", step, epoch, loss_value, rate)
            if step % cfg.checkpoint_every == 0 or step >= cfg.max_steps:
                report(with_checkpoint=True)
                last_checkpoint = step
            if step >= cfg.max_steps:
                break
        else:
            epoch += 1
            continue
        break
    if last_checkpoint != step or step == start_step:
        report(with_checkpoint=True)


def _batch_refs(store: Store, cfg: PretrainConfig):
    if cfg.batches:
        pairs = []
        for item in cfg.batches:
            center, sep, batch = item.partition("/")
            if not sep:
                raise CCSError(f"batches: {item!r} is not 'center/batch'")
            pairs.append((center, batch))
    else:
        pairs = list_batches(store)
    if not pairs:
        raise CCSError(f"no committed batches to train on in {store.uri('incoming')}")
    return [load_batch(store, c, b) for c, b in pairs]


def _manifest_hash(store: Store, refs) -> str:
    records = [read_commit(store, r.prefix, CommitRecord, "batch") for r in refs]
    return data_sha256([r.manifest_sha256 for r in records])


def _keep_ok_images(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"image": batch["image"][batch["status"] == STATUS_OK]}


def training_dataset(store: Store, cfg: PretrainConfig):
    """The tile stream of the chosen batches: readable tiles only, pixels only."""
    rows = slide_rows(_batch_refs(store, cfg))
    return tile_stream(rows, store.config, cfg.stream).map_batches(
        _keep_ok_images, batch_format="numpy", num_cpus=0.1
    )


def pretrain(cfg: PretrainConfig) -> PretrainResult:
    """Train (or resume) the run, then save the teacher encoder as a model artifact."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    store = Store(cfg.store)
    refs = _batch_refs(store, cfg)
    ds = training_dataset(store, cfg)
    if cfg.crops.normalization == "auto":
        norm = resolve_normalization(store, cfg.run_name, ds, cfg.normalization_tiles)
        cfg = cfg.model_copy(update={"crops": cfg.crops.model_copy(update={"normalization": norm})})
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    run_config = RunConfig(
        name=cfg.run_name,
        storage_path=store.path("runs"),
        storage_filesystem=store.arrow_fs if store.protocol == "s3" else None,
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
    )
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=cfg.model_dump(mode="json"),
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=run_config,
        datasets={"train": ds},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise CCSError(f"run {cfg.run_name} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    _, teacher = _build(cfg)
    teacher.load_state_dict(state["teacher"])
    metrics = result.metrics or {}
    config = cfg.model_dump(mode="json", exclude={"store"})
    card = ModelCard(
        name=cfg.model_name,
        architecture=cfg.encoder,
        task="encoder",
        tiling=cfg.stream.tiling,
        normalization=cfg.crops.normalization,
        training_config=config,
        training_config_sha256=config_sha256(config),
        data_manifest_sha256=_manifest_hash(store, refs),
        metrics={"dino_loss": float(metrics.get("loss", float("nan"))), "steps": state["step"]},
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
