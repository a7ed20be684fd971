"""Detector and classifier jobs end to end at toy size: annotated batches in, artifacts out.

Real parts throughout: a local Ray cluster, Ray Train, the Ray Data tile stream over real
pyramidal slides, the store on disk. The encoder artifact is a randomly initialised toy ViT
saved through the normal artifact path (pretraining itself is covered by test_pretrain.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from smartccs.adaptation.stain import REFERENCE_KEY
from smartccs.batches import resolve_batches
from smartccs.data.tiles import StreamConfig
from smartccs.errors import CCSError
from smartccs.labels import LabelsError, has_cell_labels, load_cell_labels, put_cell_labels
from smartccs.metrics.operating_point import OperatingPoint, operating_point
from smartccs.models.artifacts import ModelCard, load_model, save_model
from smartccs.models.detector import DETECTION_CLASSES, HeadConfig, build_detector
from smartccs.models.encoder import build_from
from smartccs.models.mil import MILConfig, MILHead
from smartccs.screening.slides import predict
from smartccs.splits import SplitConfig, assign_folds, split_rows
from smartccs.store import Store, StoreConfig
from smartccs.taxonomy import GRADES
from smartccs.train.classifier import (
    ClassifierConfig,
    _operating_point,
    fold_run,
    load_bags,
    plan_classifier,
    train_classifier,
)
from smartccs.train.detector import DetectorConfig, finetune_detector, score_detector
from smartccs.train.loop import finished_run
from smartccs.upload import upload_batch

sys.path.insert(0, str(Path(__file__).parent))
from toy_models import TOY_ENCODER, TOY_TILING

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

REPO = Path(__file__).resolve().parents[1]
TILING = TOY_TILING
SPLIT = SplitConfig(val=0.34, test=0.34, seed=0)


@pytest.fixture(scope="module")
def annotated_store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """2 centers x 6 tiny slides, uploaded with their cell annotations, and a toy encoder."""
    from smartccs.synth.cohort import generate_cohort

    out = tmp_path_factory.mktemp("annotated")
    generate_cohort(
        out / "cohort", centers=2, slides_per_center=6, size="tiny", seed=3, workers=2,
        progress=False,
    )  # fmt: skip
    store = Store(StoreConfig(uri=str(out / "store")))
    for d in sorted(p.parent for p in (out / "cohort").glob("*/manifest.json")):
        ref = upload_batch(d, center=d.name, batch="b1", store=store, progress=False)
        put_cell_labels(store, ref, d / "ground_truth" / "cells.parquet")
    torch.manual_seed(0)
    card = ModelCard(
        name="encoder", architecture=TOY_ENCODER, task="encoder", tiling=TILING, synthetic=True
    )
    save_model(store, card, build_from(TOY_ENCODER).state_dict())
    return store


def _stream(tmp: Path) -> StreamConfig:
    return StreamConfig(
        tiling=TILING, readers=1, reader_cpus=0.5, planner_cpus=0.25, batch_size=8,
        cache_dir=str(tmp / "cache"),
    )  # fmt: skip


def detector_config(store: Store, tmp: Path, max_steps: int, **kw) -> DetectorConfig:
    return DetectorConfig(
        run_name=kw.pop("run_name", "toy-detector"), store=store.config, input_px=64,
        split=SPLIT, stream=_stream(tmp), batch_size=4, max_steps=max_steps,
        checkpoint_every=2, other_tiles=0.3, eval_batch_size=16, **kw,
    )  # fmt: skip


def test_labels_refuse_unknown_slides_and_empty_boxes(annotated_store: Store):
    import pyarrow as pa

    from smartccs.batches import load_batch

    ref = load_batch(annotated_store, "int-a", "b1")
    good = {"slide_id": [ref.manifest.slides[0].slide_id], "class": ["HSIL"]}
    with pytest.raises(LabelsError, match="not in int-a/b1"):
        put_cell_labels(
            annotated_store, ref,
            pa.table({"slide_id": ["nope"], "class": ["HSIL"], "x0": [0], "y0": [0], "x1": [5],
                      "y1": [5]}),
        )  # fmt: skip
    with pytest.raises(LabelsError, match="row 0: empty box"):
        put_cell_labels(
            annotated_store, ref, pa.table(good | {"x0": [5], "y0": [0], "x1": [5], "y1": [5]})
        )
    with pytest.raises(LabelsError, match="missing column 'x1'"):
        put_cell_labels(annotated_store, ref, pa.table(good | {"x0": [5], "y0": [0]}))
    assert has_cell_labels(annotated_store, "int-a", "b1")
    cells = load_cell_labels(annotated_store, [ref])
    assert set(cells) == {("int-a", "b1", s.slide_id) for s in ref.manifest.slides}


@pytest.mark.parametrize(
    ("head", "input_px", "named"),
    [({"window_px": 24}, 64, "window of 24 px"), ({}, 60, "input 60x60 px")],
)
def test_a_window_or_input_off_the_encoders_patch_grid_is_refused_before_any_tile_is_read(
    annotated_store: Store, tmp_path: Path, head: dict, input_px: int, named: str
):
    cfg = detector_config(
        annotated_store, tmp_path, max_steps=2, run_name="toy-bad-window",
        head=HeadConfig(width=16, **head),
    ).model_copy(update={"input_px": input_px})  # fmt: skip
    with pytest.raises(CCSError, match=f"head.window_px / input_px .*: {named}"):
        finetune_detector(cfg)
    assert not annotated_store.list("runs", "toy-bad-window"), "nothing started"


def test_detector_then_classifier_train_and_save_artifacts(annotated_store: Store, tmp_path: Path):
    # int-b is a held-out center: never trained on although ``batches`` (empty) means "all"
    cfg = detector_config(annotated_store, tmp_path, max_steps=3, holdout_batches=["int-b/b1"])
    first = finetune_detector(cfg)
    assert (first.start_step, first.step) == (0, 3)
    card, state = load_model(annotated_store, "detector")
    assert card.version == first.version and card.task == "detector" and card.synthetic
    assert card.classes == list(DETECTION_CLASSES) and card.head["input_px"] == 64
    assert card.training_config["encoder_version"] != "latest", "the encoder version is pinned"
    assert card.training_config["batches"] == ["int-a/b1"], "held-out batches are not trained on"
    assert "map50" in card.metrics and 0 <= card.metrics["map50"] <= 1
    assert first.holdout is not None and first.holdout.n_gt["squamous"] > 0
    assert card.metrics["holdout/map50"] == first.holdout.map
    # the stain range it was trained on, which adaptation calibrates new centers into
    assert set(card.head[REFERENCE_KEY]["centers"]) == {"int-a"}
    calibrated = first.holdout_calibrated
    assert (calibrated is None) == ("holdout_calibrated/map50" not in card.metrics)
    again = score_detector(annotated_store, "detector", first.version, ["int-b/b1"], cfg.stream)
    assert again.to_metrics() == pytest.approx(first.holdout.to_metrics()), "re-scored alike"
    detector = build_detector(card)
    detector.load_state_dict(state)  # strict: the artifact rebuilds from its card alone
    dets = detector.eval().detect(torch.rand(2, 3, 64, 64))
    assert len(dets) == 2

    # resuming a run of the same name is the shared loop's, pinned by test_pretrain.py
    cfg = ClassifierConfig(
        run_name="toy-classifier", store=annotated_store.config, split=SPLIT,
        stream=_stream(tmp_path), mil=MILConfig(pooling="attention", hidden=16, top_k=5),
        batch_size=2, max_steps=4, checkpoint_every=2, n_boot=200, prototype_slides=2,
        threshold_folds=2,
    )  # fmt: skip
    result = train_classifier(cfg)
    assert 0 <= result.test.auc <= 1 and result.test.n_pos + result.test.n_neg >= 2
    assert np.asarray(result.confusion).sum() == result.test.n_pos + result.test.n_neg
    card, state = load_model(annotated_store, "classifier")
    assert card.task == "classifier" and card.classes == list(GRADES)
    assert card.head["detector"]["version"] == first.version
    assert 0 <= card.head["threshold"] <= 1 and card.metrics["test_auc"] == result.test.auc
    head = MILHead(card.head["dim"], MILConfig.model_validate(card.head["mil"]))
    head.load_state_dict(state)
    assert head.prototypes.shape == (len(GRADES), card.head["dim"])  # filled: test_mil_and_bags
    bags = annotated_store.list("runs", "toy-classifier")
    assert any("/bags-detector-" in k for k in bags), "screened bags are kept for a resume"

    # the stored threshold is the one reaching the target sensitivity on out-of-fold scores:
    # recomputed here from the kept bags, the split and each fold's head (never the test slides)
    op = OperatingPoint.model_validate(card.head["operating_point"])
    assert op == result.operating_point and op.threshold == card.head["threshold"]
    assert op.target_sensitivity == cfg.target_sensitivity == 0.90
    assert op.chosen_on == "out-of-fold (2 folds)" and op.reference is not None
    assert card.metrics["val_sensitivity"] == op.sensitivity >= 0.90
    kept = load_bags(annotated_store, next(k for k in bags if "/bags-detector-" in k))
    refs = resolve_batches(annotated_store, [])
    grade = {(r.center, r.batch, s.slide_id): s.grade for r in refs for s in r.manifest.slides}
    parts = split_rows(refs, SPLIT)
    pool = [(r["center"], r["batch"], r["slide_id"]) for r in parts["train"] + parts["val"]]
    pool = [k for k in pool if kept[k].ok]
    folds = assign_folds([(k, grade[k] != "NILM") for k in pool], 2, SPLIT.seed)
    scores = np.zeros(len(pool))
    # the run's own config: its batches and detector version pinned at job start
    ran = plan_classifier(cfg).model_copy(update={"detector_version": str(first.version)})
    for i in range(2):
        fold_head = MILHead(card.head["dim"], MILConfig.model_validate(card.head["mil"]))
        done = finished_run(annotated_store, fold_run(ran, i))
        assert done is not None, f"fold {i}'s head is a finished run of its own"
        fold_head.load_state_dict(done.state["model"])
        held = [j for j, k in enumerate(pool) if folds[k] == i]
        scores[held] = 1 - predict(fold_head, [kept[pool[j]] for j in held])[:, 0]
    assert op == operating_point(
        [grade[k] != "NILM" for k in pool], scores, 0.90, chosen_on="out-of-fold (2 folds)"
    )
    assert op.n_slides == len(pool)
    assert op.resolved == (op.n_pos >= 10) and (op.note is None) == op.resolved


def test_detector_job_on_a_store_with_unannotated_batches_trains_on_the_annotated_ones(
    annotated_store: Store, tmp_path: Path, monkeypatch, caplog
):
    """The job door as a user takes it on their own store: a config of their own (outside the
    repository), ``batches: []``, and a batch whose annotations are not there yet."""
    import logging
    import shutil

    store_dir = tmp_path / "store"
    shutil.copytree(annotated_store.config.uri, store_dir)
    store = Store(StoreConfig(uri=str(store_dir)))
    cohort = Path(annotated_store.config.uri).parent / "cohort"
    center = sorted(p.parent for p in cohort.glob("*/manifest.json"))[0]
    upload_batch(center, center=center.name, batch="b2", store=store, progress=False)
    cfg = detector_config(store, tmp_path, max_steps=2, run_name="toy-own-store")
    config = tmp_path / "mine" / "detector.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    monkeypatch.setattr(sys, "path", [*sys.path, str(REPO)])
    from jobs import finetune_detector as job

    with caplog.at_level(logging.INFO, logger="smartccs"):
        assert job.main(["--config", str(config), "--store", str(store_dir)]) == 0
    assert any(f"skipped 1: {center.name}/b2 (no cell annotations)" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    card, _ = load_model(store, "detector")
    assert card.training_config["batches"] == ["int-a/b1", "int-b/b1"]
    assert card.metrics["steps"] == 2


@pytest.mark.parametrize(
    "name", ["detector-demo", "classifier-demo", "detector-prod", "classifier-prod"]
)
def test_demo_configs_validate(name: str):
    model = DetectorConfig if name.startswith("detector") else ClassifierConfig
    raw = yaml.safe_load((REPO / f"jobs/configs/{name}.yaml").read_text())
    cfg = model.model_validate(raw)
    if model is ClassifierConfig:  # the screening operating point, chosen on validation
        assert cfg.target_sensitivity == 0.90
    if name.endswith("-demo"):  # fits a 2-core machine
        assert cfg.scaling.cpus_per_worker <= 1 and not cfg.scaling.use_gpu
    else:
        assert cfg.scaling.use_gpu and cfg.store.uri.startswith("s3://")


def test_a_validation_split_without_abnormal_slides_cannot_choose_a_threshold():
    with pytest.raises(CCSError, match="validation slides.*needs both classes.*split.val"):
        _operating_point(np.array([False, False]), np.array([0.2, 0.4]), 0.9)
