"""The main job: the Smart-CCS study end to end, on the platform's own jobs and engine.

Stages (each logged as ``[n/7]``, each resumable: a re-run of the same study id skips what
its state file says is done, and Ray Train runs resume from their checkpoints):

1. generate the synthetic cohort and upload it as batches (``smartccs.study.cohort``);
2. pretrain the encoder on the internal training slides, unlabelled (``jobs.pretrain``);
3. finetune the detector twice: from random weights and from the pretrained encoder;
4. train a slide classifier on each detector;
5. screen the internal and external test batches once per arm, each arm in a store of its
   own under ``runs/<study>/arms/<arm>/``: Base (random init, no adaptation), w/ P
   (pretrained), w/ P&A (pretrained, test-time adaptation batch by batch); then w/ P&A is
   published at the store's top level for the other doors, its classifier as
   ``models/classifier`` and its result partitions under ``results/``
   (``smartccs.study.publish``);
6. evaluate each arm per kind of center (``smartccs.evaluation``);
7. write the ablation table and report under ``runs/<study>/report/``.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from smartccs import layout
from smartccs.batches import load_batch
from smartccs.commits import copy_committed
from smartccs.engine.config import ScreeningConfig
from smartccs.engine.screen import screen_batches
from smartccs.errors import CCSError
from smartccs.evaluation.report import Evaluation
from smartccs.evaluation.run import run_evaluation
from smartccs.models.artifacts import load_card
from smartccs.models.refs import encoder_ref
from smartccs.store import Store, StoreConfig
from smartccs.study.ablation import (
    KINDS,
    AblationRow,
    ablation_rows,
    format_table,
    operating_points,
    write_ablation,
)
from smartccs.study.cohort import StudyBatch, center_kinds, cut_batches, ensure_uploaded
from smartccs.study.config import Arm, StudyConfig
from smartccs.study.publish import PUBLISHED_ARM, publish_arm

log = logging.getLogger(__name__)

STAGES = 7


class StudyState(BaseModel):
    """What the study has finished, kept at ``runs/<study>/state.json`` after every stage."""

    batches: list[StudyBatch] = Field(default_factory=list)
    encoder: str | None = None
    detectors: dict[str, str] = Field(default_factory=dict, description="init -> version")
    detector_map: dict[str, float] = Field(default_factory=dict)
    classifiers: dict[str, str] = Field(default_factory=dict, description="init -> version")
    classifier_auc: dict[str, float | None] = Field(default_factory=dict)
    screened: dict[str, str] = Field(default_factory=dict, description="arm -> run id")
    seconds: dict[str, float] = Field(default_factory=dict, description="stage -> seconds")


class StudyResult(BaseModel):
    study_id: str
    report: str
    rows: list[AblationRow]
    table: str
    state: StudyState


class _Study:
    def __init__(self, cfg: StudyConfig):
        self.cfg = cfg
        self.store = Store(cfg.store)
        self.id = cfg.study_id()
        self.settings = cfg.settings()
        self.state_key = f"{layout.run(self.id)}/state.json"
        self.state = (
            StudyState.model_validate_json(self.store.read_bytes(self.state_key))
            if self.store.exists(self.state_key)
            else StudyState()
        )

    def save(self) -> None:
        self.store.write_bytes(self.state_key, self.state.model_dump_json(indent=2).encode())

    def stage(self, n: int, what: str) -> float:
        log.info("[%d/%d] %s", n, STAGES, what)
        return time.perf_counter()

    def done(self, name: str, t0: float) -> None:
        self.state.seconds[name] = round(time.perf_counter() - t0, 1)
        self.save()

    def ids(self, role: str, kind: str | None = None) -> list[str]:
        return [
            b.id for b in self.state.batches if b.role == role and (kind is None or b.kind == kind)
        ]

    def job(self, section: str, run: str, **fields: Any) -> dict[str, Any]:
        return self.settings[section] | {
            "run_name": f"{self.id}-{run}",
            "store": self.cfg.store.model_dump(mode="json"),
            "seed": self.cfg.seed,
            **fields,
        }

    def arm_store(self, arm: Arm) -> Store:
        root = self.cfg.store
        uri = f"{root.uri.rstrip('/')}/{layout.run(self.id)}/arms/{arm.name}"
        return Store(StoreConfig(uri=uri, s3=root.s3))


def _cohort(s: _Study) -> None:
    from smartccs.synth.cohort import generate_cohort

    cfg = s.cfg
    cohort = cfg.cohort_path()
    t0 = s.stage(1, f"synthetic cohort in {cohort} (synthetic data, not patient slides)")
    if not (cohort / "cohort.json").is_file():
        generate_cohort(
            cohort,
            centers=cfg.centers,
            slides_per_center=cfg.slides_per_center,
            size=cfg.size,
            seed=cfg.seed,
            abnormal_density_scale=cfg.abnormal_density_scale,
        )
    kinds = set(center_kinds(cohort).values())
    if kinds != {"internal", "external"}:
        raise CCSError(
            f"the study needs internal and external centers; --centers {cfg.centers} gives "
            f"only {', '.join(sorted(kinds))} (the built-in order is int, int, ext, ...)"
        )
    tag = cfg.batch_tag()
    cut = cut_batches(
        cohort, cohort / "batches", tag, cfg.test_fraction, cfg.batch_slides, cfg.seed
    )
    for folder, b in cut:
        ensure_uploaded(s.store, folder, b.center, b.batch)
    s.state.batches = [b for _, b in cut]
    for kind in KINDS:
        for role in ("train", "test"):
            n = sum(b.slides for b in s.state.batches if (b.kind, b.role) == (kind, role))
            if n:
                log.info("%s %s: %d slides", kind, role, n)
    s.done("cohort", t0)


def _pretrain(s: _Study) -> None:
    from smartccs.train.pretrain import PretrainConfig, pretrain

    if s.state.encoder:
        return
    t0 = s.stage(2, "self-supervised pretraining (DINO + iBOT) on the internal training slides")
    raw = s.job("pretrain", "pretrain", batches=s.ids("train"), model_name="encoder")
    s.state.encoder = pretrain(PretrainConfig.model_validate(raw)).version
    s.done("pretrain", t0)


def _per_init(
    s: _Study, n: int, job: str, what: str, done: dict[str, str], train: Callable[[str], str]
) -> None:
    """Stage ``n`` once per detector start (random, pretrained), skipping finished ones."""
    for init in ("random", "pretrained"):
        if init in done:
            continue
        t0 = s.stage(n, what.format(init=init))
        done[init] = train(init)
        s.done(f"{job}-{init}", t0)


def _split(raw: dict[str, Any], seed: int) -> dict[str, Any]:
    return raw | {"split": raw.get("split", {}) | {"seed": seed}}


def _detectors(s: _Study) -> None:
    from smartccs.train.detector import DetectorConfig, abnormal_map, finetune_detector

    def train(init: str) -> str:
        raw = s.job(
            "detector", f"detector-{init}", batches=s.ids("train"), init=init,
            model_name=f"detector-{init}", encoder_model="encoder",
            encoder_version=s.state.encoder,
        )  # fmt: skip
        r = finetune_detector(DetectorConfig.model_validate(_split(raw, s.cfg.seed)))
        s.state.detector_map[init] = round(abnormal_map(r.report), 4)
        return r.version

    what = "abnormal-cell detector, backbone from {init} weights"
    _per_init(s, 3, "detector", what, s.state.detectors, train)


def _classifiers(s: _Study) -> None:
    from smartccs.train.classifier import ClassifierConfig, train_classifier

    def train(init: str) -> str:
        raw = s.job(
            "classifier", f"classifier-{init}", batches=s.ids("train"),
            model_name=f"classifier-{init}", detector_model=f"detector-{init}",
            detector_version=s.state.detectors[init],
        )  # fmt: skip
        r = train_classifier(ClassifierConfig.model_validate(_split(raw, s.cfg.seed)))
        s.state.classifier_auc[init] = r.test.auc if r.test else None
        return r.version

    what = "slide classifier on the {init}-init detector's cells"
    _per_init(s, 4, "classifier", what, s.state.classifiers, train)


def _models_of(store: Store, classifier: str, version: str) -> list[tuple[str, str]]:
    """The classifier and every model it pins (detector, the encoder that embeds its cells)."""
    card = load_card(store, classifier, version)
    det = card.head["detector"]
    det_card = load_card(store, det["name"], det["version"])
    emb = encoder_ref(det_card)
    pinned = det_card.training_config
    out = [(classifier, version), (det["name"], det["version"]), (emb.name, emb.version)]
    out.append((pinned["encoder_model"], pinned["encoder_version"]))  # architecture source
    return list(dict.fromkeys(out))


def _screen(s: _Study) -> None:
    for arm in s.cfg.arms:
        if arm.name in s.state.screened:
            continue
        t0 = s.stage(5, f"screening the test batches: {arm.label}")
        dst = s.arm_store(arm)
        tests = [b for b in s.state.batches if b.role == "test"]
        for b in tests:
            copy_committed(s.store, dst, layout.incoming(b.center, b.batch))
            labels = f"{layout.labels(b.center, b.batch)}/cells.parquet"
            if s.store.exists(labels) and not dst.exists(labels):
                dst.write_bytes(labels, s.store.read_bytes(labels))
        name, version = f"classifier-{arm.init}", s.state.classifiers[arm.init]
        for model, v in _models_of(s.store, name, version):
            copy_committed(s.store, dst, layout.model(model, v))
        screening = ScreeningConfig.model_validate(
            s.settings["screening"]
            | {
                "classifier_model": name,
                "classifier_version": version,
                "adapt": {"method": arm.adapt},
            }
        )
        refs = [load_batch(dst, b.center, b.batch) for b in tests]
        outcomes = screen_batches(dst, refs, screening, run_id=f"{s.id}-{arm.name}")
        failed = sum(o.failed for o in outcomes)
        if failed:
            log.warning("%s: %d slides failed to screen (see the slides table)", arm.label, failed)
        s.state.screened[arm.name] = outcomes[0].run_id
        s.done(f"screen-{arm.name}", t0)


def _publish_arm(s: _Study) -> None:
    """w/ P&A's classifier and results at the store's top level, once (docs/study.md)."""
    arm = next(a for a in s.cfg.arms if a.name == PUBLISHED_ARM)
    classifier = (f"classifier-{arm.init}", s.state.classifiers[arm.init])
    tests = [(b.center, b.batch) for b in s.state.batches if b.role == "test"]
    done = publish_arm(s.store, s.arm_store(arm), classifier, tests)
    log.info(
        "%s published in %s: %s (a copy of %s/%s), results of %d batches under results/ "
        "(%d copied now)", arm.label, s.store.uri(), done.classifier, *classifier, len(tests),
        done.partitions,
    )  # fmt: skip


def _evaluate(s: _Study, out: Path) -> dict[str, dict[str, Evaluation]]:
    t0 = s.stage(6, "evaluating each arm on internal and external centers")
    evals: dict[str, dict[str, Evaluation]] = {}
    for arm in s.cfg.arms:
        evals[arm.name] = {}
        for kind in KINDS:
            centers = sorted({b.center for b in s.state.batches if b.kind == kind})
            evals[arm.name][kind] = run_evaluation(
                s.arm_store(arm),
                out / arm.name / kind,
                centers=centers,
                max_slides=s.cfg.report_slides,
            )
    s.done("evaluate", t0)
    return evals


def _publish(s: _Study, local: Path) -> str:
    """The report folder under ``runs/<study>/report/`` in the store; where to open it."""
    prefix = f"{layout.run(s.id)}/report"
    if s.store.protocol == "file":
        return str(Path(s.store.path(prefix)) / "index.html")
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        s.store.put_file(f, f"{prefix}/{f.relative_to(local).as_posix()}")
    return s.store.uri(prefix, "index.html")


def run_study(cfg: StudyConfig) -> StudyResult:
    """Run (or resume) the study; print nothing, return the table and the report's place."""
    from smartccs.raycluster import init_ray

    s = _Study(cfg)
    log.info("study %s in %s (resumes if run before)", s.id, s.store.uri(layout.run(s.id)))
    _cohort(s)
    init_ray(cfg.address)
    _pretrain(s)
    _detectors(s)
    _classifiers(s)
    _screen(s)
    _publish_arm(s)
    with tempfile.TemporaryDirectory(prefix="ccs-report-") as tmp:
        local = (
            Path(s.store.path(layout.run(s.id), "report"))
            if s.store.protocol == "file"
            else Path(tmp)
        )
        evals = _evaluate(s, local)
        t0 = s.stage(7, "ablation table and report")
        rows = ablation_rows(cfg.arms, evals)
        thresholds = operating_points(cfg.arms, evals)
        context = {
            "study": s.id,
            "store": s.store.uri(),
            "cohort": str(cfg.cohort_path()),
            "detector held-out abnormal mAP@0.5": s.state.detector_map,
            "classifier thresholds (out-of-fold on the training slides)": thresholds,
            "adaptation of w/ P&A": cfg.adapt,
            "stage seconds": s.state.seconds,
        }
        write_ablation(local, cfg.arms, evals, rows, context)
        report = _publish(s, local)
        s.done("report", t0)
    table = format_table(rows) + "".join(f"\n  {a}: {w}" for a, w in thresholds.items())
    return StudyResult(study_id=s.id, report=report, rows=rows, table=table, state=s.state)
