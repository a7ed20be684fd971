"""The main job (``ccs demo``): cohort cut into batches, arms screened in stores of their own,
the ablation table and report, w/ P&A published at the store's top level, and a re-run
resuming from the study's state.

Training is covered by test_pretrain.py and test_finetune_jobs.py; a full study trains five
models (minutes even at a few steps), so here the training stages find their models already
in the study's state, as a resumed study does, and those models are the tiny random-weight
ones of toy_models (toy_study.py). Everything else is the production path on the shared Ray:
real synthetic slides, uploads, the screening engine with and without adaptation, evaluation
and figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
from toy_study import ToyDemo, run_toy_study

from smartccs import layout
from smartccs.manifest import Manifest
from smartccs.models.artifacts import latest_version, list_versions, load_card
from smartccs.results.tables import read_commit, read_table
from smartccs.store import Store, StoreConfig
from smartccs.study.cohort import cut_batches
from smartccs.study.config import StudyConfig


def test_cut_batches_keeps_internal_test_slides_out_of_training(toy_demo_cohort: Path, tmp_path):
    cohort = StudyConfig(cohort_dir=str(toy_demo_cohort), centers=3, slides_per_center=4)
    cut = cut_batches(cohort.cohort_path(), tmp_path, "t", 0.34, 2, seed=0)
    by_center: dict[str, dict[str, set[str]]] = {}
    for folder, b in cut:
        ids = {s.slide_id for s in Manifest.loads((folder / "manifest.json").read_bytes()).slides}
        assert (len(ids) == b.slides and b.slides <= 2) or b.role == "train"
        by_center.setdefault(b.center, {}).setdefault(b.role, set()).update(ids)
        cells = pq.read_table(folder / "ground_truth" / "cells.parquet")
        assert set(cells["slide_id"].to_pylist()) <= ids  # each batch carries only its labels
    assert set(by_center) == {"int-a", "int-b", "ext-a"}
    assert "train" not in by_center["ext-a"] and len(by_center["ext-a"]["test"]) == 4
    for c in ("int-a", "int-b"):
        assert by_center[c]["train"] and by_center[c]["test"]
        assert not by_center[c]["train"] & by_center[c]["test"]
        assert len(by_center[c]["train"] | by_center[c]["test"]) == 4


def test_another_abnormal_density_is_another_cohort_with_other_batch_names_and_id():
    dense, plain = StudyConfig(), StudyConfig(abnormal_density_scale=1)
    assert dense.abnormal_density_scale == 10
    assert dense.cohort_path() != plain.cohort_path()
    assert dense.batch_tag() != plain.batch_tag()  # the old slides' batches are never reused
    assert dense.study_id() != plain.study_id()


def test_a_published_classifier_is_a_copy_made_once_that_never_takes_latest_back(
    tmp_path: Path,
):
    from toy_models import save_toy_models

    from smartccs.models.artifacts import load_model
    from smartccs.study.publish import publish_model

    store = Store(StoreConfig(uri=str(tmp_path / "store")))
    src = save_toy_models(store, names=("encoder", "detector-pretrained", "classifier-pretrained"))
    version = publish_model(store, src.name, src.version)
    card, weights = load_model(store, "classifier", version)
    source, source_weights = load_model(store, src.name, src.version)
    assert card.head == source.head | {"published_from": {"name": src.name, "version": src.version}}
    assert card.weights_sha256 == source.weights_sha256 and weights.keys() == source_weights.keys()
    assert latest_version(store, "classifier") == version
    assert publish_model(store, src.name, src.version) == version  # once
    mine = save_toy_models(store, seed=1, names=("enc-mine", "det-mine", "classifier"))
    assert publish_model(store, src.name, src.version) == version
    assert latest_version(store, "classifier") == mine.version  # a user's newer one stays LATEST
    assert list_versions(store, "classifier") == sorted([version, mine.version])


def test_ablation_table_has_the_operating_point_with_cis_and_the_roc_readings(tmp_path: Path):
    from test_evaluation import CFG, cells_table, two_centers

    from smartccs.evaluation.report import evaluate
    from smartccs.metrics.classification import wilson_ci
    from smartccs.metrics.operating_point import operating_point
    from smartccs.study.ablation import (
        HEADER,
        ablation_rows,
        format_table,
        operating_points,
        write_ablation,
    )

    slides, truth = two_centers()
    ev = evaluate(slides, cells_table(), truth, None, CFG)
    op = operating_point([1, 1, 1, 0, 0, 0], [0.9, 0.6, 0.3, 0.5, 0.2, 0.1], 0.90)
    with_op = ev.model_copy(update={"model": ev.model.model_copy(update={"operating_point": op})})
    arms = StudyConfig().arms
    evals = {a.name: dict.fromkeys(("internal", "external"), with_op) for a in arms}
    evals["base"] = dict.fromkeys(("internal", "external"), ev)  # a card without one
    rows = ablation_rows(arms, evals)
    overall = rows[0]
    assert (overall.kind, overall.group, overall.arm) == ("internal", "overall", "Base")
    assert (overall.sensitivity, overall.specificity) == (1.0, 0.8)  # at each slide's 0.5
    assert overall.specificity_ci == wilson_ci(4, 5)
    assert overall.specificity_at == {"0.90": 1.0, "0.95": 1.0}  # off the ROC: b1 ranks last
    assert HEADER[-4:] == ("sens. (95% CI)", "spec. (95% CI)", "spec@sens.90", "spec@sens.95")
    lo, hi = wilson_ci(4, 5)
    line = format_table(rows).splitlines()[2].split()
    assert line[-6:] == ["1.00", "(0.44-1.00)", "0.80", f"({lo:.2f}-{hi:.2f})", "1.00", "1.00"]
    # 8 scored of the 9 slides with truth (a7 failed); 7 adequate (a3 inadequate)
    assert HEADER[3:6] == ("slides", "adequate", "abnormal") and line[3:6] == ["8", "7/9", "4"]
    assert (overall.adequate, overall.total, overall.failed, overall.rejected) == (7, 9, 1, 0)
    table = format_table(rows)
    assert "Wilson" in table and "each slide at its own" in table
    assert "Not scored (no score, in no metric): internal Base: 1 failed;" in table
    words = operating_points(arms, evals)
    assert words["Base"] == "not recorded in the classifier's card"
    assert words["w/ P"].startswith(op.describe())  # threshold 0.3 chosen on 6 slides ...
    assert "not resolved: only 3 abnormal validation slides" in words["w/ P&A"]
    write_ablation(tmp_path, arms, evals, rows, {"classifier thresholds (validation)": words})
    md = (tmp_path / "ablation.md").read_text()
    assert "| spec@sens.90 | spec@sens.95 |" in md and "Wilson" in md
    assert "| 7/9 |" in md and "external w/ P&A: 1 failed." in md
    page = (tmp_path / "index.html").read_text()
    assert "threshold 0.3 chosen on 6" in page and "adequate" in page


def test_study_screens_every_arm_in_its_own_store_and_reports_the_ablation(toy_demo: ToyDemo):
    cfg, result = toy_demo.config, toy_demo.result
    store = Store(cfg.store)

    tests = [b for b in result.state.batches if b.role == "test"]
    assert {b.kind for b in tests} == {"internal", "external"}
    expected = {(b.center, b.batch) for b in tests}
    n_test = sum(b.slides for b in tests)
    for arm in cfg.arms:
        arm_store = Store(
            StoreConfig(uri=f"{cfg.store.uri}/{layout.run(result.study_id)}/arms/{arm.name}")
        )
        slides = read_table(arm_store, "slides")
        assert slides.num_rows == n_test  # every test slide once, nothing else
        assert (
            set(zip(slides["center"].to_pylist(), slides["batch"].to_pylist(), strict=False))
            == expected
        )
        adaptation = set(slides["adaptation"].to_pylist())
        if arm.adapt == "none":
            assert adaptation == {None}
        else:  # every center's batches carried its adapted state forward
            assert None not in adaptation and all(a.startswith("smartccs:") for a in adaptation)
        assert set(slides["classifier"].to_pylist()) == {
            f"classifier-{arm.init}/{result.state.classifiers[arm.init]}"
        }
    # the main tables hold only what was published there: w/ P&A's partitions, copied with
    # their commits; its classifier is models/classifier, a copy pinning the same models
    pa_store = Store(StoreConfig(uri=f"{cfg.store.uri}/{layout.run(result.study_id)}/arms/pa"))
    assert read_table(store, "slides").equals(read_table(pa_store, "slides"))
    assert read_table(store, "cells").equals(read_table(pa_store, "cells"))
    commits = {(c, b): read_commit(store, c, b) for c, b in expected}
    assert commits == {(c, b): read_commit(pa_store, c, b) for c, b in expected}
    published = load_card(store, "classifier")  # LATEST
    source = load_card(store, "classifier-pretrained", result.state.classifiers["pretrained"])
    assert published.head["published_from"] == {"name": source.name, "version": source.version}
    assert published.weights_sha256 == source.weights_sha256
    assert published.head["detector"] == source.head["detector"]

    arms = [a.label for a in cfg.arms]
    groups = {(r.kind, r.group) for r in result.rows}
    assert {("internal", "overall"), ("external", "overall"), ("external", "ext-a")} <= groups
    for kind, group in groups:
        assert [r.arm for r in result.rows if (r.kind, r.group) == (kind, group)] == arms
    report = Path(result.report)
    assert report.is_file() and report.parent == Path(
        store.path(layout.run(result.study_id), "report")
    )
    page = report.read_text()
    assert "SYNTHETIC" in page
    for arm in cfg.arms:
        for kind in ("internal", "external"):
            assert f'href="{arm.name}/{kind}/report.html"' in page
            assert (report.parent / arm.name / kind / "report.html").is_file()
    saved = json.loads((report.parent / "ablation.json").read_text())
    assert len(saved["rows"]) == len(result.rows)
    assert "spec@sens.90" in result.table and "Base: not recorded" in result.table  # toy cards

    # a re-run of the same study resumes: nothing is screened again, the table is the same
    runs = {a.name: result.state.screened[a.name] for a in cfg.arms}
    again = run_toy_study(cfg)
    assert again.state.screened == runs and again.table == result.table
    # ... and publishes nothing twice: one classifier copy, the same commits
    assert list_versions(store, "classifier") == [latest_version(store, "classifier")]
    assert {(c, b): read_commit(store, c, b) for c, b in expected} == commits
