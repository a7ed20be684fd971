"""The part every Ray Train job here shares: config fields, the worker loop, the trainer.

A job supplies a *learner* (its model, loss and optimizer and the step that moves them) and a
dataset; this module runs the learner over the worker's shard for ``max_steps`` optimizer steps,
checkpoints model, optimizer, step, epoch and position in the epoch to
``<store>/runs/<run name>/`` through Ray Train, resumes from the newest checkpoint when the run
is restarted (a failed worker, or the same run name submitted again), and logs step, loss,
throughput and ETA every ``log_every`` steps (and the first and the last) where the job's logs
show them. On resume the interrupted epoch skips as many batches
as it had trained on; Ray Data's streaming order is not fixed, so they are as many, not
necessarily the same ones.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from smartccs.errors import CCSError
from smartccs.ids import Id
from smartccs.models.artifacts import config_sha256
from smartccs.store import Store, StoreConfig

if TYPE_CHECKING:
    from smartccs.logs import Progress

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
FINISHED_FILE = "finished.json"  # runs/<run name>/: the final checkpoint of a completed run


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


class RunFields(BaseModel):
    """Fields of every training run's config (the YAML under jobs/configs/)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_name: Id = Field(description="re-running with the same name resumes this run")
    store: StoreConfig = Field(default_factory=StoreConfig.from_env)
    optimizer: OptimizerConfig = OptimizerConfig()
    scaling: ScalingFields = ScalingFields()
    batch_size: int = Field(default=16, ge=1, description="items per step per worker")
    shuffle_buffer: int = Field(
        default=256,
        ge=0,
        description="items each worker draws its batches from at random (0: stream order); "
        "the stream yields neighbouring tiles of one slide together, which SGD must not see "
        "as a batch",
    )
    materialize: bool = Field(
        default=False,
        description="read the training data once and keep it in the object store: a small "
        "cohort trained for many epochs then stops re-reading (and re-planning) every slide "
        "each epoch; leave off for data larger than the object store",
    )
    max_steps: int = Field(default=100, ge=1, description="optimizer steps; schedules span it")
    max_epochs: int = Field(default=100, ge=1, description="passes over the data, at most")
    checkpoint_every: int = Field(default=20, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(default=2, ge=1)
    max_failures: int = Field(default=2, ge=0, description="worker failures survived")
    log_every: int | None = Field(
        default=None,
        ge=1,
        description="steps between progress lines (step, loss, throughput, ETA); the first "
        "and the last step always get one; null: about 20 lines a run",
    )
    seed: int = 0


def lr_at(step: int, cfg: RunFields) -> float:
    """Learning rate of an optimizer step: linear warm-up, then cosine to ``min_lr``."""
    o = cfg.optimizer
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    frac = (step - o.warmup_steps) / max(1, cfg.max_steps - o.warmup_steps)
    return o.min_lr + (o.lr - o.min_lr) * (1 + math.cos(math.pi * min(1.0, frac))) / 2


def log_interval(cfg: RunFields) -> int:
    """Steps between progress lines: ``log_every``, else about 20 lines over ``max_steps``."""
    return cfg.log_every or max(1, math.ceil(cfg.max_steps / 20))


def autocast_enabled(cfg: RunFields, device: torch.device) -> bool:
    return cfg.scaling.use_gpu and cfg.scaling.mixed_precision and device.type == "cuda"


class Learner(Protocol):
    """What a job gives the loop: state to checkpoint and a step over one batch."""

    def state(self) -> dict[str, Any]: ...

    def load(self, state: dict[str, Any]) -> None: ...

    def prepare(self) -> None:
        """Move to the device and wrap for data parallelism, after any checkpoint is loaded."""

    def train_batch(self, batch: dict[str, np.ndarray], step: int, gen: torch.Generator) -> int:
        """One optimizer step; returns how many items (tiles, slides) it consumed."""

    @property
    def last_loss(self) -> float: ...


def optimizer_step(
    opt: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    loss: torch.Tensor,
    step: int,
    cfg: RunFields,
) -> float:
    """Backward, clip, step at the scheduled rate; a non-finite loss stops the run loudly."""
    for group in opt.param_groups:
        group["lr"] = lr_at(step, cfg) * group.get("lr_scale", 1.0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.optimizer.clip_grad:
        torch.nn.utils.clip_grad_norm_(params, cfg.optimizer.clip_grad)
    opt.step()
    value = float(loss.detach())
    if not np.isfinite(value):
        raise FloatingPointError(f"step {step + 1}: loss is {value}")
    return value


def _resume(cfg: RunFields, learner: Learner) -> tuple[int, int, int]:
    """Load the run's newest checkpoint into ``learner``, if there is one: (step, epoch,
    batches of that epoch already trained on), all 0 for a fresh run."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, 0, 0
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    learner.load(state)
    step, epoch = int(state["step"]), int(state["epoch"])
    position = int(state.get("position", 0))
    log.info(
        "resumed %s at step %d (epoch %d, batch %d of it)", cfg.run_name, step, epoch, position
    )
    return step, epoch, position


@dataclass
class _WorkerRun:
    """One worker's run in progress: where it is (what a checkpoint saves and a progress line
    or a report tells) and what it needs to take the next step."""

    cfg: RunFields
    learner: Learner
    unit: str
    rank: int
    gen: torch.Generator
    progress: Progress
    t0: float
    step: int
    epoch: int
    position: int  # batches of the current epoch already trained on
    start_step: int
    seen: int = 0

    def report(self, with_checkpoint: bool) -> None:
        """Report metrics to Ray Train, with a checkpoint (written by rank 0) when asked."""
        import ray.train

        metrics = {
            "step": self.step,
            "epoch": self.epoch,
            "start_step": self.start_step,
            "loss": self.learner.last_loss,
            f"{self.unit}_per_s": self.seen / max(1e-9, time.monotonic() - self.t0),
        }
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if self.rank == 0:
                extra = {"step": self.step, "epoch": self.epoch, "position": self.position}
                torch.save(self.learner.state() | extra, Path(d) / STATE_FILE)
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)

    def log_progress(self) -> None:
        """Rank 0's progress line, when one is due at this step."""
        if self.rank != 0 or not self.progress.due(self.step):
            return
        rate = self.seen / max(1e-9, time.monotonic() - self.t0)
        log.info(
            "step %d/%d epoch %d loss %.4f %.1f %s/s %s",
            self.step,
            self.cfg.max_steps,
            self.epoch,
            self.learner.last_loss,
            rate,
            self.unit,
            self.progress.eta(self.step),
        )

    def epoch_batches(self, shard: Any) -> Iterable[dict[str, np.ndarray]]:
        """This worker's batches of the current epoch, shuffled by a seed of rank and epoch."""
        cfg = self.cfg
        seed = cfg.seed + 1000 * self.rank + self.epoch
        return shard.iter_batches(
            batch_size=cfg.batch_size,
            batch_format="numpy",
            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=seed if cfg.shuffle_buffer else None,
        )

    def train(self, shard: Any) -> int:
        """Step until ``max_steps`` or ``max_epochs``, checkpointing every
        ``checkpoint_every`` steps and at the last; returns the step last checkpointed."""
        cfg = self.cfg
        last_checkpoint = self.step
        skip = self.position
        while self.step < cfg.max_steps and self.epoch < cfg.max_epochs:
            for batch in self.epoch_batches(shard):
                if skip:  # the resumed epoch continues from its position instead of restarting
                    skip -= 1
                    continue
                n = self.learner.train_batch(batch, self.step, self.gen)
                self.position += 1
                if n == 0:
                    continue
                self.step += 1
                self.seen += n
                self.log_progress()
                if self.step % cfg.checkpoint_every == 0 or self.step >= cfg.max_steps:
                    self.report(with_checkpoint=True)
                    last_checkpoint = self.step
                if self.step >= cfg.max_steps:
                    break
            else:
                self.epoch += 1
                self.position = 0
                continue
            break
        return last_checkpoint


def worker_loop(
    cfg: RunFields,
    make_learner: Callable[[torch.device, Callable[[Any], Any]], Learner],
    unit: str = "tiles",
) -> None:
    """Runs on every Ray Train worker: the learner's steps over this worker's shard."""
    import ray.train
    import ray.train.torch

    from smartccs.logs import Progress, apply_ray_train_worker_output, configure_logging

    configure_logging()
    apply_ray_train_worker_output()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(cfg.seed)  # same init on every worker; DDP broadcasts it anyway
    learner = make_learner(ray.train.torch.get_device(), ray.train.torch.prepare_model)
    step, epoch, position = _resume(cfg, learner)
    learner.prepare()
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank * 100_003 + step)
    shard = ray.train.get_dataset_shard("train")
    t0 = time.monotonic()
    progress = Progress(cfg.max_steps, every=log_interval(cfg), start=step)
    run = _WorkerRun(cfg, learner, unit, rank, gen, progress, t0, step, epoch, position, step)
    last_checkpoint = run.train(shard)
    if last_checkpoint != run.step or run.step == run.start_step:
        run.report(with_checkpoint=True)


class FitResult(BaseModel):
    """The final checkpoint's state and the last metrics a run reported."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    state: dict[str, Any]
    metrics: dict[str, Any]


def fit(
    cfg: RunFields, loop: Callable[[dict[str, Any]], None], datasets: dict[str, Any]
) -> FitResult:
    """Run ``loop`` on a TorchTrainer sized by the config; checkpoints under runs/<run name>."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from smartccs.logs import ray_train_log_level

    store = Store(cfg.store)
    done = finished_run(store, cfg)
    if done is not None:
        return done
    if cfg.materialize:
        log.info("reading the training data once (materialize: true)")
        datasets = {name: ds.materialize() for name, ds in datasets.items()}
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    trainer = TorchTrainer(
        loop,
        train_loop_config=cfg.model_dump(mode="json"),
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=store.path("runs"),
            storage_filesystem=store.arrow_fs if store.protocol == "s3" else None,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            logging_config=LoggingConfig(log_level=ray_train_log_level()),
        ),
        datasets=datasets,
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise CCSError(f"run {cfg.run_name} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    metrics = dict(result.metrics or {})
    mark = {
        "config_sha256": _run_sha256(cfg),
        "checkpoint": Path(result.checkpoint.path).name,
        "metrics": metrics,
    }
    store.write_bytes(
        f"runs/{cfg.run_name}/{FINISHED_FILE}", json.dumps(mark, default=float).encode()
    )
    return FitResult(state=state, metrics=metrics)


Run = tuple[RunFields, Callable[[dict[str, Any]], None], dict[str, Any]]
"""What :func:`fit` takes: the run's config, its worker loop, its datasets."""


def fit_many(runs: list[Run]) -> list[FitResult]:
    """Independent runs (the classifier's fold heads and its own head) side by side, as many
    at once as the cluster holds their worker groups, results in order.

    A small run is mostly its trainer starting (controller, worker group, data split), which
    then overlaps instead of adding up. More at once than the nodes hold would not queue: a
    worker group waits only ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` for its resources.
    """
    from concurrent.futures import ThreadPoolExecutor

    at_once = runs_at_once(runs[0][0].scaling, len(runs)) if runs else 1
    if at_once <= 1:
        return [fit(*run) for run in runs]
    log.info("%d training runs, %d at once", len(runs), at_once)
    with ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="fit") as pool:
        return list(pool.map(lambda run: fit(*run), runs))


def runs_at_once(scaling: ScalingFields, wanted: int) -> int:
    """How many of ``wanted`` runs scaled so can hold their workers on the cluster together
    (its nodes as :func:`smartccs.raycluster.cluster_nodes` counts them), at least 1."""
    from smartccs.raycluster import Demand, cluster_nodes, unplaced

    one = {"CPU": scaling.cpus_per_worker, "GPU": scaling.gpus_per_worker * scaling.use_gpu}
    found = cluster_nodes(wanted * scaling.num_workers)
    if found is None:  # an autoscaler without bound: it makes room
        return wanted
    nodes = found[0]
    for n in range(wanted, 1, -1):
        if unplaced([Demand("worker", one, n * scaling.num_workers)], nodes) is None:
            return n
    return 1


def _run_sha256(cfg: RunFields) -> str:
    # how often a run logs is no part of what it computes: hashed as its former default (1),
    # so that runs finished before it changed still count as finished
    return config_sha256(cfg.model_dump(mode="json", exclude={"store"}) | {"log_every": 1})


def finished_run(store: Store, cfg: RunFields) -> FitResult | None:
    """The final state of a run that already completed under this very config, or None.

    Re-running a finished run (a re-run demo or study) would otherwise start a trainer and
    read all its data (minutes) only to find the last step done. Any change to the config,
    ``max_steps`` included, goes through the trainer, which resumes from the checkpoint.
    """
    from ray.train import Checkpoint

    if not store.exists("runs", cfg.run_name, FINISHED_FILE):
        return None
    mark = json.loads(store.read_bytes("runs", cfg.run_name, FINISHED_FILE))
    if mark.get("config_sha256") != _run_sha256(cfg):
        return None
    path = store.path("runs", cfg.run_name, mark["checkpoint"])
    ckpt = Checkpoint(path, filesystem=store.arrow_fs if store.protocol == "s3" else None)
    try:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    except (FileNotFoundError, OSError) as e:
        log.warning("run %s: its final checkpoint is gone (%s); training again", cfg.run_name, e)
        return None
    log.info(
        "run %s already finished at step %s: its final checkpoint, no training",
        cfg.run_name,
        state.get("step"),
    )
    return FitResult(state=state, metrics=mark.get("metrics", {}))
