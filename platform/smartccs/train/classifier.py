"""Training the slide classifier (MIL head over top-K cells per class) as a Ray Train job.

1. Every slide of the chosen batches goes through the screening engine's first stages (tile
   stream, detector, crop and embed with the frozen encoder, top-K per class): one bag per slide,
   kept under ``runs/<run>/`` so a resumed run does not screen again.
2. A TorchTrainer fits the MIL head on the training slides' bags against their manifest grades.
3. The operating threshold on the slide score (1 - P(NILM)) is chosen for
   ``target_sensitivity`` on scores no head was trained on: by default out-of-fold scores of
   every training and validation slide (``threshold_folds`` heads, each fit without its fold;
   the saved head is then fit on all of them), else the validation split's. It is stored with
   what it reached there and the class score distributions (``operating_point`` in the card's
   head); AUC with a bootstrap CI, sensitivity and specificity are measured on the test slides.
4. The prototype bank for test-time adaptation is built: per grade, the mean cell embedding of
   the most confident training slides. It is saved with the head as ``models/classifier/<v>``.
"""

from __future__ import annotations

import io
import logging
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from smartccs import layout
from smartccs.batches import BatchRef, manifests_sha256, resolve_batches
from smartccs.data.tiles import StreamConfig
from smartccs.engine.config import ScorerPool
from smartccs.engine.stream import screen_bags
from smartccs.errors import CCSError
from smartccs.ids import Id, SlideKey
from smartccs.metrics.classification import BinaryReport, binary_report, confusion_matrix
from smartccs.metrics.operating_point import OperatingPoint, operating_point
from smartccs.models.artifacts import ModelCard, config_sha256, load_card, save_model
from smartccs.models.mil import MILConfig, MILHead, abnormal_logit, pooled_embedding
from smartccs.models.refs import ModelRef, encoder_ref
from smartccs.screening.bags import SlideBag
from smartccs.screening.cells import CellConfig
from smartccs.screening.slides import predict
from smartccs.splits import SplitConfig, split_rows
from smartccs.store import Store
from smartccs.taxonomy import GRADES
from smartccs.train.loop import Run, RunFields, fit_many, optimizer_step, worker_loop
from smartccs.train.selection import batch_ids, check_splits, graded_batches
from smartccs.train.threshold_folds import out_of_fold_scores, slide_folds

log = logging.getLogger(__name__)


class ClassifierConfig(RunFields):
    """One classifier run; jobs/configs/classifier-*.yaml is this model."""

    batches: list[str] = Field(
        default_factory=list,
        description="graded 'center/batch' pairs; empty: every committed batch whose slides "
        "all have a grade (the others are skipped, and logged)",
    )
    model_name: Id = "classifier"
    detector_model: Id = "detector"
    detector_version: str = Field(default="latest", description="resolved once, at job start")
    mil: MILConfig = MILConfig()
    cells: CellConfig = CellConfig()
    split: SplitConfig = SplitConfig()
    stream: StreamConfig = StreamConfig(readers=1, reader_cpus=0.5, planner_cpus=0.25)
    scorers: ScorerPool = ScorerPool()
    class_weights: Literal["balanced", "screening", "none"] = Field(
        default="balanced",
        description="balanced: grades by inverse frequency (rare grades count); screening: "
        "NILM and abnormal slides weigh half each, grades equal within the abnormal half",
    )
    screening_loss: float = Field(
        default=0.0,
        ge=0,
        description="weight of a NILM-vs-abnormal term (BCE on log P(abnormal)/P(NILM)) beside "
        "the 7-grade cross-entropy: the slide score is 1 - P(NILM), and with few slides per "
        "grade the grade loss alone barely shapes that one decision",
    )
    prototype_slides: int = Field(default=100, ge=1, description="per grade, most confident")
    target_sensitivity: float = Field(
        default=0.90,
        gt=0,
        le=1,
        description="the stored threshold is the highest one reaching this sensitivity on the "
        "validation slides: screening is judged on the abnormal slides it catches first",
    )
    threshold_folds: int = Field(
        default=5,
        ge=0,
        description="choose the threshold on out-of-fold scores of the training and "
        "validation slides (this many heads, each fit without its fold; the saved head is fit "
        "on all of them): a validation split of a few dozen slides holds too few abnormal ones "
        "to place a 0.90 target. 0 or 1: on the validation split alone",
    )
    n_boot: int = Field(default=1000, ge=100)


class ClassifierResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    version: str
    step: int
    test: BinaryReport | None = Field(description="None when split.test is 0")
    threshold: float
    operating_point: OperatingPoint = Field(description="chosen on held-out scores")
    confusion: list[list[int]] | None


# -- bags ---------------------------------------------------------------------------------


def _bags_key(cfg: ClassifierConfig, detector: ModelRef) -> str:
    return f"{layout.run(cfg.run_name)}/bags-{detector.name}-{detector.version}.npz"


def save_bags(store: Store, key: str, bags: dict[SlideKey, SlideBag]) -> None:
    items = list(bags.values())
    buf = io.BytesIO()
    np.savez(
        buf,
        keys=np.array([list(b.key) for b in items], dtype=str).reshape(-1, 3),
        embeddings=np.stack([b.embeddings for b in items]),
        scores=np.stack([b.scores for b in items]),
        boxes=np.stack([b.boxes for b in items]),
        mask=np.stack([b.mask for b in items]),
        counts=np.array([[b.n_tiles, b.tiles_read, b.n_squamous] for b in items]),
        errors=np.array([b.error for b in items], dtype=str),
    )
    store.write_bytes(key, buf.getvalue())


def load_bags(store: Store, key: str) -> dict[SlideKey, SlideBag]:
    z = np.load(io.BytesIO(store.read_bytes(key)))
    out = {}
    for i, (c, b, s) in enumerate(z["keys"].tolist()):
        n_tiles, read, squamous = (int(v) for v in z["counts"][i])
        err = str(z["errors"][i])
        out[(c, b, s)] = SlideBag(
            c, b, s, z["embeddings"][i], z["scores"][i], z["boxes"][i], z["mask"][i],
            n_tiles=n_tiles, tiles_read=read, n_squamous=squamous, errors=[err] if err else [],
        )  # fmt: skip
    return out


def _grade_index(grade: str | None, key: SlideKey) -> int:
    if grade is None:
        raise CCSError(f"slide {'/'.join(key)} has no ground-truth grade in its manifest")
    return GRADES.index(grade)


# -- learner ------------------------------------------------------------------------------


class MILLearner:
    def __init__(
        self, cfg: ClassifierConfig, dim: int, weights: list[float], device, wrap=lambda m: m
    ):
        self.cfg, self.device, self.wrap = cfg, device, wrap
        self.raw = MILHead(dim, cfg.mil)
        self.model: Any = self.raw
        self.params = list(self.raw.parameters())
        self.opt = torch.optim.AdamW(
            self.params, lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay
        )
        self.weights = torch.tensor(weights, dtype=torch.float32)
        self.last_loss = float("nan")

    def prepare(self) -> None:
        self.model = self.wrap(self.raw)
        self.raw = getattr(self.model, "module", self.model)
        self.weights = self.weights.to(self.device)

    def state(self) -> dict[str, Any]:
        return {"model": self.raw.state_dict(), "optimizer": self.opt.state_dict()}

    def load(self, state: dict[str, Any]) -> None:
        self.raw.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])

    def train_batch(self, batch: dict[str, np.ndarray], step: int, gen: torch.Generator) -> int:
        self.model.train()
        t = {k: torch.from_numpy(batch[k]).to(self.device) for k in _BAG_FIELDS}
        logits = self.model(t["embeddings"], t["scores"], t["mask"])
        loss = torch.nn.functional.cross_entropy(logits, t["grade"], weight=self.weights)
        if self.cfg.screening_loss:
            abnormal = (t["grade"] != GRADES.index("NILM")).to(logits.dtype)
            bce = torch.nn.functional.binary_cross_entropy_with_logits(
                abnormal_logit(logits), abnormal
            )
            loss = loss + self.cfg.screening_loss * bce
        self.last_loss = optimizer_step(self.opt, self.params, loss, step, self.cfg)
        return len(batch["grade"])


_BAG_FIELDS = ("embeddings", "scores", "mask", "grade")


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: MIL steps over this worker's shard of slide bags."""
    dim, weights = config.pop("_dim"), config.pop("_weights")
    cfg = ClassifierConfig.model_validate(config)
    worker_loop(cfg, lambda d, wrap: MILLearner(cfg, dim, weights, d, wrap), unit="slides")


def _bag_rows(bags: list[SlideBag], grades: list[int]) -> list[dict[str, Any]]:
    return [
        {"embeddings": b.embeddings, "scores": b.scores, "mask": b.mask, "grade": np.int64(g)}
        for b, g in zip(bags, grades, strict=True)
    ]


def grade_weights(grades: list[int], how: str) -> np.ndarray:
    """Cross-entropy weight per grade (0 for a grade no training slide has)."""
    counts = np.bincount(grades, minlength=len(GRADES)).astype(float)
    present = counts > 0
    if how == "balanced":
        return np.where(present, counts.sum() / (present.sum() * np.maximum(counts, 1)), 0.0)
    if how == "screening":
        nilm = GRADES.index("NILM")
        abnormal = counts.sum() - counts[nilm]
        w = np.where(present, counts.sum() / (2 * max(abnormal, 1)), 0.0)
        w[nilm] = counts.sum() / (2 * max(counts[nilm], 1))
        return w
    return np.ones(len(GRADES))


def _head_run(cfg: ClassifierConfig, bags: list[SlideBag], grades: list[int], dim: int) -> Run:
    """The trainer's run of one MIL head on these bags."""
    import ray

    w = grade_weights(grades, cfg.class_weights)
    ds = ray.data.from_items(_bag_rows(bags, grades))

    def loop(config: dict[str, Any]) -> None:
        train_loop(config | {"_dim": dim, "_weights": w.tolist()})

    return cfg, loop, {"train": ds}


def prototype_bank(
    bags: list[SlideBag], grades: list[int], probs: np.ndarray, per_grade: int, dim: int
) -> torch.Tensor:
    """(7, D): per grade, mean cell embedding of the ``per_grade`` most confident slides."""
    bank = torch.zeros(len(GRADES), dim)
    grades_a = np.asarray(grades)
    for g in range(len(GRADES)):
        idx = np.flatnonzero(grades_a == g)
        idx = idx[np.argsort(-probs[idx, g], kind="stable")][:per_grade]
        if len(idx):
            pooled = [
                pooled_embedding(
                    torch.from_numpy(bags[i].embeddings), torch.from_numpy(bags[i].mask)
                )
                for i in idx
            ]
            bank[g] = torch.stack(pooled).mean(0)
    return bank


def fold_run(cfg: ClassifierConfig, fold: int) -> ClassifierConfig:
    """The run that fits the head without fold ``fold`` (its own checkpoints, so it resumes)."""
    return cfg.model_copy(update={"run_name": f"{cfg.run_name}-fold{fold}"})


def _head(dim: int, mil: MILConfig, state: dict[str, Any]) -> MILHead:
    head = MILHead(dim, mil)
    head.load_state_dict(state)
    return head


def fold_runs(
    cfg: ClassifierConfig, bags: list[SlideBag], grades: list[int], folds: np.ndarray, dim: int
) -> list[Run]:
    """Per fold, the run of a head fit without that fold's slides."""
    runs, k = [], int(folds.max()) + 1
    for i in range(k):
        fit_on = np.flatnonzero(folds != i)
        log.info("threshold fold %d of %d: head fit on %d slides, scores %d", i + 1, k,
                 len(fit_on), len(bags) - len(fit_on))  # fmt: skip
        runs.append(_head_run(fold_run(cfg, i), [bags[j] for j in fit_on],
                              [grades[j] for j in fit_on], dim))  # fmt: skip
    return runs


def _operating_point(
    y: np.ndarray, scores: np.ndarray, target: float, chosen_on: str = "validation split"
) -> OperatingPoint:
    """The threshold for ``target`` sensitivity on held-out scores, logged."""
    try:
        op = operating_point(y, scores, target, chosen_on=chosen_on)
    except ValueError as exc:
        raise CCSError(
            f"cannot choose the threshold on the validation slides: {exc}; give the validation "
            "split abnormal and NILM slides (split.val, or more graded slides)"
        ) from None
    log.info("%s", op.describe())
    if op.note:
        log.warning("target sensitivity not resolved: %s", op.note)
    return op


def needed_splits(cfg: ClassifierConfig) -> tuple[str, ...]:
    """The validation split chooses the threshold unless folds do; ``split.test: 0`` is for a
    caller that tests on batches of its own."""
    return ("train", *(() if cfg.threshold_folds >= 2 else ("val",)),
            *(("test",) if cfg.split.test > 0 else ()))  # fmt: skip


def plan_classifier(cfg: ClassifierConfig) -> ClassifierConfig:
    """The run with its batches pinned (``batches: []``: every batch graded throughout) and its
    splits checked, from manifests alone: what the job checks before Ray starts."""
    refs = graded_batches(Store(cfg.store), cfg.batches)
    check_splits(refs, cfg.split, needed_splits(cfg), f"classifier run {cfg.run_name!r}")
    return cfg.model_copy(update={"batches": batch_ids(refs)})


def _screened_bags(
    store: Store, cfg: ClassifierConfig, detector: ModelRef, splits: dict[str, list[dict[str, Any]]]
) -> dict[SlideKey, SlideBag]:
    """Every split slide's bag: the run's saved ones when they exist (a resumed run does not
    screen again), else screened now and saved."""
    key = _bags_key(cfg, detector)
    if store.exists(key):
        log.info("reusing the screened bags at %s", store.uri(key))
        return load_bags(store, key)
    rows = [r for part in splits.values() for r in part]
    log.info("screening %d slides into top-%d cell bags", len(rows), cfg.mil.top_k)
    screened = screen_bags(store, rows, detector, cfg.cells, cfg.stream, cfg.scorers, cfg.mil.top_k)
    bags = {b.key: b for b in screened}
    save_bags(store, key, bags)
    return bags


def _split_bags(
    splits: dict[str, list[dict[str, Any]]],
    bags: dict[SlideKey, SlideBag],
    grade_of: dict[SlideKey, str | None],
) -> dict[str, tuple[list[SlideBag], list[int]]]:
    """Per split, the bags of the slides that were read and their grades; the others are
    left out, each logged with why."""
    part: dict[str, tuple[list[SlideBag], list[int]]] = {}
    for name, rows in splits.items():
        ks = [(r["center"], r["batch"], r["slide_id"]) for r in rows]
        ok = [k for k in ks if bags[k].ok]
        for k in set(ks) - set(ok):
            log.warning("slide %s left out: %s", "/".join(k), bags[k].error or "no tile read")
        part[name] = ([bags[k] for k in ok], [_grade_index(grade_of[k], k) for k in ok])
    return part


def _choose_threshold(
    cfg: ClassifierConfig,
    folds: tuple[np.ndarray, int] | None,
    pooled_grades: list[int],
    val_abnormal: np.ndarray,
    val_probs: np.ndarray,
) -> OperatingPoint:
    """The operating point on out-of-fold scores when there are folds, else on the
    validation split (said in the log when folds were asked for but could not be made)."""
    if folds is not None:
        oof, k = folds
        return _operating_point(np.asarray(pooled_grades) != 0, oof, cfg.target_sensitivity,
                                f"out-of-fold ({k} folds)")  # fmt: skip
    if cfg.threshold_folds >= 2:
        log.warning("too few slides of a class for %d folds: threshold chosen on the "
                    "validation split", cfg.threshold_folds)  # fmt: skip
    return _operating_point(val_abnormal, 1 - val_probs[:, 0], cfg.target_sensitivity)


def _test_report(
    cfg: ClassifierConfig,
    grades: list[int],
    is_abnormal: np.ndarray,
    probs: np.ndarray,
    threshold: float,
) -> tuple[BinaryReport, list[list[int]]]:
    """The test slides' screening report and grade confusion at the threshold, logged."""
    test = binary_report(is_abnormal, 1 - probs[:, 0], threshold,
                         n_boot=cfg.n_boot, seed=cfg.seed)  # fmt: skip
    confusion = confusion_matrix(
        [GRADES[g] for g in grades],
        [GRADES[int(i)] for i in probs.argmax(1)],
        GRADES,
    ).tolist()
    log.info(
        "held-out slides: AUC %.3f (95%% CI %.3f-%.3f), sensitivity %.3f, specificity %.3f "
        "at threshold %.3f",
        test.auc, test.auc_ci_low, test.auc_ci_high, test.sensitivity, test.specificity,
        threshold,
    )  # fmt: skip
    return test, confusion


def _test_metrics(test: BinaryReport | None) -> dict[str, float]:
    """The card's test metrics; none without test slides."""
    if test is None:
        return {}
    rates = ("auc", "auc_ci_low", "auc_ci_high", "sensitivity", "specificity")
    tested = {f"test_{name}": getattr(test, name) for name in rates}
    return tested | {"test_slides": float(test.n_pos + test.n_neg)}


def _classifier_card(
    cfg: ClassifierConfig,
    store: Store,
    refs: list[BatchRef],
    det_card: ModelCard,
    enc_card: ModelCard,
    dim: int,
    op: OperatingPoint,
    test: BinaryReport | None,
    steps: int,
) -> ModelCard:
    """The saved head's card: what it screens with (detector, encoder, threshold), what it
    was trained on and how, and what it reached."""
    config = cfg.model_dump(mode="json", exclude={"store"})
    detector = ModelRef(name=det_card.name, version=str(det_card.version))
    return ModelCard(
        name=cfg.model_name,
        architecture=enc_card.architecture,
        task="classifier",
        classes=list(GRADES),
        head={
            "mil": cfg.mil.model_dump(mode="json"),
            "cells": cfg.cells.model_dump(mode="json"),
            "detector": detector.model_dump(),
            "encoder": encoder_ref(det_card).model_dump(),
            "dim": dim,
            "threshold": op.threshold,
            "operating_point": op.model_dump(mode="json"),
        },
        tiling=det_card.tiling,
        normalization=enc_card.normalization,
        training_config=config,
        training_config_sha256=config_sha256(config),
        data_manifest_sha256=manifests_sha256(store, refs),
        metrics=_test_metrics(test)
        | {
            "threshold": op.threshold,
            "target_sensitivity": op.target_sensitivity,
            "val_sensitivity": op.sensitivity,
            "val_specificity": op.specificity,
            "steps": float(steps),
        },
        synthetic=True,
    )


def train_classifier(cfg: ClassifierConfig) -> ClassifierResult:
    """Screen the slides into bags, fit the head, pick the threshold, measure, save."""
    store = Store(cfg.store)
    cfg = plan_classifier(cfg)
    refs = resolve_batches(store, cfg.batches)
    det_card = load_card(store, cfg.detector_model, cfg.detector_version)
    detector = ModelRef(name=det_card.name, version=str(det_card.version))
    cfg = cfg.model_copy(update={"detector_version": detector.version})  # pinned: bags, card
    enc = encoder_ref(det_card)
    enc_card = load_card(store, enc.name, enc.version)
    splits = split_rows(refs, cfg.split)  # none that is needed empty: plan_classifier checked
    grade_of = {(r.center, r.batch, s.slide_id): s.grade for r in refs for s in r.manifest.slides}
    part = _split_bags(splits, _screened_bags(store, cfg, detector, splits), grade_of)
    dim = int(part["train"][0][0].embeddings.shape[-1])
    pooled = (part["train"][0] + part["val"][0], part["train"][1] + part["val"][1])
    assigned = None
    if cfg.threshold_folds >= 2:
        assigned = slide_folds(cfg.threshold_folds, cfg.split.seed, *pooled)
    runs: list[Run] = []
    if assigned is not None:  # every train and val slide chooses; the head learns from all
        runs = fold_runs(cfg, *pooled, assigned[0], dim)
        part["train"] = pooled
    *fold_fits, fitted = fit_many([*runs, _head_run(cfg, *part["train"], dim)])
    oof = None
    if assigned is not None:
        heads = [_head(dim, cfg.mil, run.state["model"]) for run in fold_fits]
        oof = (out_of_fold_scores(heads, pooled[0], assigned[0]), assigned[1])
    head = _head(dim, cfg.mil, fitted.state["model"])
    probs = {name: predict(head, b) for name, (b, _) in part.items()}
    is_abnormal = {name: np.asarray(g) != 0 for name, (_, g) in part.items()}
    op = _choose_threshold(cfg, oof, pooled[1], is_abnormal["val"], probs["val"])
    threshold = op.threshold
    head.prototypes.copy_(prototype_bank(*part["train"], probs["train"], cfg.prototype_slides, dim))
    test, confusion = None, None
    if part["test"][0]:
        test, confusion = _test_report(
            cfg, part["test"][1], is_abnormal["test"], probs["test"], threshold
        )
    step = int(fitted.state["step"])
    card = _classifier_card(cfg, store, refs, det_card, enc_card, dim, op, test, step)
    version = save_model(store, card, head.state_dict())
    log.info("saved %s as %s", cfg.model_name, store.uri(layout.model(cfg.model_name, version)))
    return ClassifierResult(
        version=version,
        step=step,
        test=test,
        threshold=threshold,
        operating_point=op,
        confusion=confusion,
    )
