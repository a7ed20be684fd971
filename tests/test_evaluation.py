"""Evaluation of screening results: metrics on hand-built tables with known answers, the truth
sources, real PNG figures of a real synthetic slide, the report folder, and ``ccs evaluate``
end to end on committed result tables of an uploaded synthetic batch."""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli import assert_one_line_error, run_ccs
from PIL import Image

from smartccs.evaluation.figures import cell_gallery, confusion_figure, roc_figure, slide_heatmap
from smartccs.evaluation.render import choose_slides, write_report
from smartccs.evaluation.report import (
    Evaluation,
    EvaluationConfig,
    EvaluationError,
    evaluate,
    slide_outcomes,
)
from smartccs.evaluation.truth import TruthError, slide_truth, truth_from_file
from smartccs.labels import SlideBoxes
from smartccs.manifest import Manifest
from smartccs.metrics.classification import wilson_ci
from smartccs.results.schema import CELLS, SLIDES, grade_column
from smartccs.slide.reader import open_slide
from smartccs.store import Store
from smartccs.taxonomy import GRADES

CFG = EvaluationConfig(n_boot=200, seed=0)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def slide_row(slide_id: str, status: str = "screened", score: float | None = None, **kw) -> dict:
    """One slides-table row (schema columns; unset ones null)."""
    scored = status != "failed"
    grade = kw.pop("predicted_grade", None)
    if scored and grade is None:
        grade = "HSIL" if (score or 0) >= 0.5 else "NILM"
    row = {
        "slide_id": slide_id,
        "run_id": "run-1",
        "status": status,
        "error": "unreadable file" if not scored else None,
        "score": score if scored else None,
        "predicted_grade": grade if scored else None,
        "threshold": 0.5 if scored else None,
        "positive": (score >= 0.5) if scored and score is not None else None,
        "classifier": "classifier/v1" if scored else None,
        "detector": "detector/v1" if scored else None,
        "encoder": "encoder/v1" if scored else None,
        "adequate": status == "screened" if scored else None,
        "screened_at": NOW,
    }
    if scored and score is not None:
        row[grade_column("NILM")] = 1.0 - score
    row.update(kw)
    return row


def in_memory(schema: pa.Schema, rows: list[dict], centers: list[tuple[str, str]]) -> pa.Table:
    """Rows as ``read_table`` returns them: ``center`` and ``batch`` columns in front."""
    t = pa.Table.from_pylist(rows, schema=schema)
    t = t.add_column(0, "batch", pa.array([b for _, b in centers], pa.string()))
    return t.add_column(0, "center", pa.array([c for c, _ in centers], pa.string()))


def slides_table(rows: list[tuple[str, str, dict]]) -> pa.Table:
    return in_memory(SLIDES, [r for _, _, r in rows], [(c, b) for c, b, _ in rows])


def cells_table(rows: list[tuple[str, str, dict]] = ()) -> pa.Table:
    return in_memory(CELLS, [r for _, _, r in rows], [(c, b) for c, b, _ in rows])


def truth_table(rows: list[tuple[str, str, str, str]]) -> pa.Table:
    cols = list(zip(*rows, strict=True)) if rows else [[], [], [], []]
    return pa.table(
        {
            n: pa.array(c, pa.string())
            for n, c in zip(("center", "batch", "slide_id", "grade"), cols, strict=True)
        }
    )


def cell_row(slide_id: str, cls: str, box, score: float, rank: int = 0) -> dict:
    x0, y0, x1, y1 = box
    return {
        "slide_id": slide_id,
        "run_id": "run-1",
        "cell_class": cls,
        "rank": rank,
        "score": score,
        "x0": x0,
        "y0": y0,
        "x1": x1,
        "y1": y1,
    }


def two_centers() -> tuple[pa.Table, pa.Table]:
    """Center A: 3 abnormal + 3 NILM slides, perfectly separated, one inadequate and one failed
    abnormal slide; center B: NILM only (single class)."""
    rows = [
        ("A", "b1", slide_row("a1", score=0.9)),
        ("A", "b1", slide_row("a2", score=0.8)),
        ("A", "b1", slide_row("a3", "inadequate", score=0.7)),
        ("A", "b1", slide_row("a4", score=0.3)),
        ("A", "b1", slide_row("a5", score=0.2)),
        ("A", "b1", slide_row("a6", score=0.1)),
        ("A", "b1", slide_row("a7", "failed")),
        ("B", "b2", slide_row("b1", score=0.6, predicted_grade="LSIL")),
        ("B", "b2", slide_row("b2", score=0.2)),
        ("B", "b2", slide_row("x9", score=0.4)),  # no ground truth
    ]
    truth = [
        ("A", "b1", "a1", "HSIL"),
        ("A", "b1", "a2", "HSIL"),
        ("A", "b1", "a3", "LSIL"),
        ("A", "b1", "a4", "NILM"),
        ("A", "b1", "a5", "NILM"),
        ("A", "b1", "a6", "NILM"),
        ("A", "b1", "a7", "HSIL"),
        ("B", "b2", "b1", "NILM"),
        ("B", "b2", "b2", "NILM"),
        ("B", "b2", "b3", "NILM"),  # never screened
    ]
    return slides_table(rows), truth_table(truth)


# --- metrics ------------------------------------------------------------------------------


def test_perfect_separation_failed_and_inadequate_slides_and_groups():
    slides, truth = two_centers()
    ev = evaluate(slides, cells_table(), truth, None, CFG)
    assert [g.name for g in ev.groups] == ["overall", "A", "B"]
    a = ev.group("A")
    # the failed slide is counted, with its truth, but not scored
    assert (a.n_slides, a.n_positive, a.n_scored, a.n_failed, a.n_failed_positive) == (
        7,
        4,
        6,
        1,
        1,
    )
    assert (a.n_inadequate, a.n_inadequate_positive) == (1, 1)
    assert a.binary is not None and a.binary_reason is None
    assert a.binary.auc == 1.0 and (a.binary.auc_ci_low, a.binary.auc_ci_high) == (1.0, 1.0)
    assert (a.binary.n_pos, a.binary.n_neg) == (3, 3)  # the inadequate slide is scored
    assert (a.binary.sensitivity, a.binary.specificity, a.binary.threshold) == (1.0, 1.0, 0.5)
    assert a.roc is not None and (a.roc.operating_fpr, a.roc.operating_tpr) == (0.0, 1.0)

    b = ev.group("B")  # NILM only: a reason, not a crash
    assert b.binary is None and b.roc is None
    assert "need both classes" in b.binary_reason and "NILM" in b.binary_reason
    assert (b.n_slides, b.n_without_truth, b.n_not_in_results) == (2, 1, 1)

    o = ev.overall
    assert o.n_slides == a.n_slides + b.n_slides and o.n_failed == 1
    assert (o.binary.n_pos, o.binary.n_neg) == (3, 5)
    # b1 (NILM, score 0.6) is the only false positive among 5 negatives
    assert o.binary.specificity == pytest.approx(4 / 5)
    assert o.binary.auc == 1.0  # b1 (0.6) is above threshold but below every positive
    assert (o.n_without_truth, o.n_not_in_results) == (1, 1)

    cm = np.array(o.confusion.counts)
    assert cm.shape == (7, 7) and o.confusion.labels == list(GRADES)
    assert o.confusion.n == cm.sum() == 8  # scored slides with truth
    g = GRADES.index
    assert cm[g("HSIL"), g("HSIL")] == 2 and cm[g("LSIL"), g("HSIL")] == 1
    assert cm[g("NILM"), g("LSIL")] == 1 and cm[g("NILM"), g("NILM")] == 4
    assert ev.model.threshold == 0.5 and ev.model.classifier == "classifier/v1"
    assert ev.model.threshold_sources == ["validation"]  # rows without threshold_source
    assert ev.partitions == ["A/b1", "B/b2"] and ev.run_ids == ["run-1"]


def test_slides_called_at_their_own_centers_thresholds(tmp_path: Path):
    """Center A's threshold was carried to 0.6 from its unlabelled slides; B's rows (an older
    version: no threshold_source) were called at the stored 0.3. Each slide counts at its own
    threshold, which a global 0.5 would count differently on both sides."""
    from smartccs.evaluation.run import summary_line

    carried = {"threshold": 0.6, "threshold_source": "center", "threshold_slides": 40}
    rows = [  # (center, slide, truth, score)
        ("A", "a1", "HSIL", 0.9),
        ("A", "a2", "HSIL", 0.55),  # missed at A's 0.6 (caught at 0.5)
        ("A", "a3", "NILM", 0.58),  # cleared at A's 0.6 (a false positive at 0.5)
        ("A", "a4", "NILM", 0.1),
        ("B", "b1", "HSIL", 0.3),  # exactly B's threshold: positive
        ("B", "b2", "HSIL", 0.45),  # caught at B's 0.3 (missed at 0.5)
        ("B", "b3", "HSIL", 0.7),
        ("B", "b4", "NILM", 0.2),
        ("B", "b5", "NILM", 0.1),
    ]
    slides = slides_table(
        [
            (c, "b1", slide_row(sid, score=sc, **(carried if c == "A" else {"threshold": 0.3})))
            for c, sid, _, sc in rows
        ]
    )
    truth = truth_table([(c, "b1", sid, g) for c, sid, g, _ in rows])
    ev = evaluate(slides, cells_table(), truth, None, CFG)

    own = {"A": np.float32(0.6), "B": np.float32(0.3)}
    called = [np.float32(sc) >= own[c] for c, _, _, sc in rows]
    pos = [g != "NILM" for _, _, g, _ in rows]
    tp = sum(c and p for c, p in zip(called, pos, strict=True))
    tn = sum(not c and not p for c, p in zip(called, pos, strict=True))
    o = ev.overall.binary
    assert (tp, tn) == (4, 4)
    assert (o.sensitivity, o.specificity) == (tp / 5, tn / 4)
    assert (o.sensitivity_ci_low, o.sensitivity_ci_high) == wilson_ci(tp, 5)
    assert o.threshold is None and (o.threshold_min, o.threshold_max) == pytest.approx((0.3, 0.6))
    assert (ev.overall.roc.operating_fpr, ev.overall.roc.operating_tpr) == (0.0, 0.8)
    assert ev.overall.roc.threshold is None
    a, b = ev.group("A").binary, ev.group("B").binary
    assert (a.sensitivity, a.specificity, a.threshold) == (0.5, 1.0, pytest.approx(0.6))
    assert (b.sensitivity, b.specificity, b.threshold) == (1.0, 1.0, pytest.approx(0.3))
    m = ev.model
    assert m.threshold is None and (m.threshold_min, m.threshold_max) == pytest.approx((0.3, 0.6))
    assert m.threshold_sources == ["center", "validation"]  # a null source: the stored one
    assert Evaluation.model_validate_json(ev.model_dump_json()).model == m

    md = write_report(ev, tmp_path / "out", progress=False).markdown.read_text()
    assert "operating threshold per center, 0.3–0.6 (carried to the center; stored" in md
    assert "| 0.3000–0.6000 |" in md and "| 0.6000 |" in md  # overall, then center A
    assert "not at one global threshold" in md
    line = summary_line(ev)
    assert "sensitivity 0.800" in line and "at threshold per center, 0.3–0.6" in line

    single = slides_table(
        [(c, "b1", slide_row(sid, score=sc, **carried)) for c, sid, _, sc in rows]
    )
    ev = evaluate(single, cells_table(), truth, None, CFG)
    assert ev.model.threshold == pytest.approx(0.6) and ev.model.threshold_sources == ["center"]
    assert "at threshold 0.6 (carried to the center)" in summary_line(ev)


def test_mixed_classifiers_are_refused_with_a_hint_to_filter():
    truth = truth_table([("A", "b1", "a1", "HSIL"), ("B", "b2", "b1", "NILM")])
    slides = slides_table(
        [
            ("A", "b1", slide_row("a1", score=0.9)),
            ("B", "b2", slide_row("b1", score=0.1, classifier="classifier/v2")),
        ]
    )
    with pytest.raises(
        EvaluationError, match=r"several classifiers \(classifier/v1, classifier/v2.*--center"
    ):
        evaluate(slides, cells_table(), truth, None, CFG)


def test_bad_results_rows_are_errors_naming_the_slide():
    truth = truth_table([("A", "b1", "a1", "HSIL")])
    no_score = slides_table([("A", "b1", slide_row("a1", score=None))])
    with pytest.raises(EvaluationError, match=r"A/b1/a1 is screened but has no finite score"):
        evaluate(no_score, cells_table(), truth, None, CFG)
    with pytest.raises(EvaluationError, match=r"no column 'threshold'"):
        evaluate(no_score.drop_columns(["threshold"]), cells_table(), truth, None, CFG)
    no_threshold = slides_table([("A", "b1", slide_row("a1", score=0.9, threshold=None))])
    with pytest.raises(EvaluationError, match=r"A/b1/a1 is screened but has no finite threshold"):
        evaluate(no_threshold, cells_table(), truth, None, CFG)
    nan = slides_table([("A", "b1", slide_row("a1", "inadequate", score=0.9, threshold=math.nan))])
    with pytest.raises(EvaluationError, match=r"A/b1/a1 is inadequate but has no finite threshold"):
        evaluate(nan, cells_table(), truth, None, CFG)
    failed = slides_table([("A", "b1", slide_row("a1", "failed"))])  # no score, no threshold
    assert evaluate(failed, cells_table(), truth, None, CFG).model.threshold is None


def test_detection_ap_is_one_for_kept_cells_that_match_the_labelled_boxes():
    slides = slides_table(
        [
            ("A", "b1", slide_row("a1", score=0.9)),
            ("A", "b1", slide_row("a2", score=0.2)),
            ("B", "b2", slide_row("b1", score=0.8)),  # no annotations: left out of detection
        ]
    )
    truth = truth_table(
        [("A", "b1", "a1", "HSIL"), ("A", "b1", "a2", "NILM"), ("B", "b2", "b1", "HSIL")]
    )
    boxes = np.array([[10, 10, 30, 30], [50, 50, 70, 70], [100, 100, 140, 140]], float)
    cell_truth = {
        ("A", "b1", "a1"): SlideBoxes(boxes, np.array(["HSIL", "HSIL", "superficial"], object)),
        ("A", "b1", "a2"): SlideBoxes(np.zeros((0, 4)), np.array([], object)),
    }
    cells = cells_table(
        [
            ("A", "b1", cell_row("a1", "HSIL", boxes[0], 0.9)),
            ("A", "b1", cell_row("a1", "HSIL", boxes[1], 0.8, rank=1)),
            ("A", "b1", cell_row("a2", "LSIL", (5, 5, 25, 25), 0.3)),  # no LSIL labelled
            ("B", "b2", cell_row("b1", "HSIL", (0, 0, 9, 9), 0.99)),
        ]
    )
    ev = evaluate(slides, cells, truth, cell_truth, CFG)
    det = ev.group("A").detection
    assert det is not None and det.n_slides == 2
    r = det.report
    assert r.ap["HSIL"] == 1.0 and r.n_gt["HSIL"] == 2 and r.n_pred["HSIL"] == 2
    assert math.isnan(r.ap["LSIL"]) and r.n_pred["LSIL"] == 1  # no truth: undefined, not 0
    assert r.map == 1.0 and r.n_gt["ASC-US"] == 0  # 'superficial' is not an abnormal class
    assert "recall is capped by K" in det.note
    assert ev.group("overall").detection.report.n_pred["HSIL"] == 2  # B's cell is not counted
    b = ev.group("B")
    assert b.detection is None and "none of the scored slides" in b.detection_reason
    dumped = json.loads(ev.model_dump_json())
    assert dumped["groups"][1]["detection"]["report"]["ap"]["LSIL"] is None  # NaN as null
    assert (
        Evaluation.model_validate_json(ev.model_dump_json()).group("A").detection.report.map == 1.0
    )

    shifted = cells.set_column(
        cells.column_names.index("x0"), "x0", pa.array([20.0, 60.0, 5.0, 0.0])
    )  # IoU 0.5 with the labelled boxes: a miss at iou 0.6
    strict = evaluate(slides, shifted, truth, cell_truth, EvaluationConfig(n_boot=10, iou=0.6))
    assert strict.group("A").detection.report.ap["HSIL"] == 0.0


def test_sensitivity_specificity_cis_and_the_roc_read_at_target_sensitivities():
    from pydantic import ValidationError

    slides, truth = two_centers()
    ev = evaluate(slides, cells_table(), truth, None, CFG)
    a, o = ev.group("A").binary, ev.overall.binary
    assert (a.sensitivity_ci_low, a.sensitivity_ci_high) == wilson_ci(3, 3)  # 3 of 3 caught
    assert (o.specificity_ci_low, o.specificity_ci_high) == wilson_ci(4, 5)  # b1 (0.6) is FP
    assert o.specificity_ci_low < 0.8 < o.specificity_ci_high
    # every positive outranks every NILM slide: on its own ROC, 0.90 and 0.95 cost no NILM
    # slide, although the stored threshold (0.5) calls b1 positive
    assert [(x.sensitivity, x.specificity) for x in o.specificity_at] == [(0.9, 1.0), (0.95, 1.0)]
    ev = evaluate(slides, cells_table(), truth, None, CFG.model_copy(update={"alpha": 0.5}))
    low, high = ev.overall.binary.specificity_ci_low, ev.overall.binary.specificity_ci_high
    assert wilson_ci(4, 5)[0] < low < high < wilson_ci(4, 5)[1]  # 50% CI inside the 95% one
    one = EvaluationConfig(n_boot=50, sensitivity_targets=(0.5,))
    assert len(evaluate(slides, cells_table(), truth, None, one).overall.binary.specificity_at) == 1
    with pytest.raises(ValidationError):
        EvaluationConfig(sensitivity_targets=(0.0,))


def test_report_shows_cis_the_roc_readings_and_the_validation_operating_point(
    local_store: Store, tmp_path: Path
):
    from toy_models import TOY_ENCODER, TOY_TILING

    from smartccs.evaluation.run import stored_operating_point
    from smartccs.metrics.operating_point import operating_point
    from smartccs.models.artifacts import ModelCard, save_model

    op = operating_point([1, 1, 1, 0, 0, 0], [0.9, 0.6, 0.3, 0.5, 0.2, 0.1], 0.90)
    card = ModelCard(
        name="classifier", architecture=TOY_ENCODER, task="classifier", tiling=TOY_TILING,
        head={"threshold": op.threshold, "operating_point": op.model_dump(mode="json")},
        synthetic=True,
    )  # fmt: skip
    version = save_model(local_store, card, {})
    assert stored_operating_point(local_store, f"classifier/{version}") == op
    assert stored_operating_point(local_store, "classifier/v1") is None  # not in this store
    assert stored_operating_point(local_store, None) is None

    slides, truth = two_centers()
    ev = evaluate(slides, cells_table(), truth, None, CFG)
    ev = ev.model_copy(update={"model": ev.model.model_copy(update={"operating_point": op})})
    files = write_report(ev, tmp_path / "out", progress=False)
    md = files.markdown.read_text()
    assert "| specificity at sensitivity 0.90 | specificity at sensitivity 0.95 |" in md
    assert "95% Wilson score" in md and "read off each group's own ROC" in md
    lo, hi = (f"{v:.3f}" for v in wilson_ci(4, 5))
    assert f"| 0.800 ({lo}-{hi}) | 1.000 | 1.000 |" in md  # overall: specificity, then ROC
    assert f"Operating point: {op.describe()}." in md  # threshold 0.3 chosen on 6 slides ...
    assert "Not resolved: only 3 abnormal validation slides" in md
    saved = Evaluation.model_validate_json(files.metrics.read_text())
    assert saved.model.operating_point == op and saved.overall.binary == ev.overall.binary
    ev = ev.model_copy(update={"model": ev.model.model_copy(update={"operating_point": None})})
    md = write_report(ev, tmp_path / "old", progress=False).markdown.read_text()
    assert "does not say how its threshold was chosen" in md


# --- truth -----------------------------------------------------------------------------------


def test_truth_file_csv_and_parquet_and_one_clear_error_per_bad_row(tmp_path: Path):
    good = tmp_path / "truth.csv"
    good.write_text("center,batch,slide_id,grade,note\nA,001,s1,HSIL,x\nA,001,s2,NILM,\n")
    t = truth_from_file(good)
    assert t.column_names == ["center", "batch", "slide_id", "grade"]
    assert t.to_pylist()[0] == {"center": "A", "batch": "001", "slide_id": "s1", "grade": "HSIL"}
    pq.write_table(t, tmp_path / "truth.parquet")
    assert truth_from_file(tmp_path / "truth.parquet").equals(t)

    bad = tmp_path / "bad.csv"
    bad.write_text("center,batch,slide_id,grade\nA,b,s1,HSIL\nA,b,s2,NILM\nA,b,s3,CIN2\n")
    with pytest.raises(TruthError) as exc:
        truth_from_file(bad)
    msg = str(exc.value)
    assert msg.startswith(str(bad)) and "row 3 (line 4)" in msg and "grade: 'CIN2'" in msg
    for text, fragment in [
        ("center,batch,grade\nA,b,NILM\n", "missing column 'slide_id'"),
        ("center,batch,slide_id,grade\nA,b,,NILM\n", "row 1 (line 2): slide_id: missing value"),
        ("center,batch,slide_id,grade\nA,b,../x,NILM\n", "row 1 (line 2): slide_id: invalid"),
        ("center,batch,slide_id,grade\nA,b,s,NILM\nA,b,s,HSIL\n", "row 2 (line 3): slide_id"),
    ]:
        bad.write_text(text)
        with pytest.raises(TruthError, match=re.escape(fragment)):
            truth_from_file(bad)
    with pytest.raises(TruthError, match="must be a .csv or .parquet"):
        truth_from_file(tmp_path / "truth.xlsx")


# --- figures and report ----------------------------------------------------------------------


def _png_size(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def _synth_slide(cohort: Path) -> tuple[Path, pa.Table]:
    """A real synthetic slide with abnormal cells, and its ground-truth abnormal cells as a
    cells table (score by cell size, so there is an order)."""
    for center_dir in sorted(p.parent for p in cohort.glob("*/manifest.json")):
        manifest = Manifest.loads((center_dir / "manifest.json").read_bytes())
        gt = pq.read_table(center_dir / "ground_truth" / "cells.parquet")
        for entry in manifest.slides:
            if entry.grade in (None, "NILM"):
                continue
            rows = [
                r for r in gt.to_pylist() if r["slide_id"] == entry.slide_id and r["is_abnormal"]
            ]
            cells = pa.table(
                {
                    "cell_class": [r["class"] for r in rows],
                    "score": np.linspace(0.99, 0.5, len(rows)).astype(np.float32),
                    **{k: [float(r[k]) for r in rows] for k in ("x0", "y0", "x1", "y1")},
                }
            )
            return center_dir / entry.path, cells
    raise AssertionError("the tiny cohort has no abnormal slide")


def test_slide_figures_on_a_real_synthetic_slide(tiny_cohort: Path, tmp_path: Path):
    path, cells = _synth_slide(tiny_cohort)
    with open_slide(path) as slide:
        heat = slide_heatmap(slide, cells, tmp_path / "h.png", mpp=12.0)
        w, h = _png_size(heat)
        assert 300 <= w <= 1500 and 200 <= h <= 1500, (w, h)
        with Image.open(heat) as im:  # the overlay is drawn: some warm (inferno) pixels
            rgb = np.asarray(im.convert("RGB")).astype(int)
        assert ((rgb[..., 0] - rgb[..., 2]) > 80).sum() > 50

        gallery = cell_gallery(slide, cells, tmp_path / "g.png", per_class=4, crop_um=56)
        n_classes = len(set(cells["cell_class"].to_pylist()))
        w, h = _png_size(gallery)
        assert 4 * 100 <= w <= 4 * 250 and n_classes * 100 <= h <= n_classes * 250 + 150
        empty = cell_gallery(slide, cells.slice(0, 0), tmp_path / "e.png")
        assert _png_size(empty)[0] > 100
        none = slide_heatmap(slide, cells.slice(0, 0), tmp_path / "n.png")
        assert _png_size(none)[0] > 100


def test_a_heatmap_on_a_report_wide_scale_shows_a_sparse_slide_cold(
    tiny_cohort: Path, tmp_path: Path
):
    """On its own scale one weak cell is as hot as a cluster; on a shared one it is faint."""
    from smartccs.evaluation.figures import heatmap_density

    path, cells = _synth_slide(tiny_cohort)
    with open_slide(path) as slide:
        own_peak = float(heatmap_density(slide, cells)[0].max())
        warm = {}
        for name, some, vmax in (
            ("colour bar alone", 0, None),
            ("own", 1, None),
            ("shared", 1, 20 * own_peak),
        ):
            png = slide_heatmap(slide, cells.slice(0, some), tmp_path / "h.png", vmax=vmax)
            with Image.open(png) as im:
                rgb = np.asarray(im.convert("RGB")).astype(int)
            warm[name] = int(((rgb[..., 0] - rgb[..., 2]) > 80).sum())
    base = warm["colour bar alone"]
    assert warm["shared"] - base < (warm["own"] - base) / 3, warm


def test_write_report_writes_md_html_json_and_linked_figures(tiny_cohort: Path, tmp_path: Path):
    path, gt_cells = _synth_slide(tiny_cohort)
    slides, truth = two_centers()
    cells = in_memory(
        CELLS,
        [
            cell_row("a1", r["cell_class"], (r["x0"], r["y0"], r["x1"], r["y1"]), r["score"])
            for r in gt_cells.to_pylist()
        ],
        [("A", "b1")] * gt_cells.num_rows,
    )
    ev = evaluate(slides, cells, truth, None, CFG)
    outcomes = slide_outcomes(slides, truth)
    order = [outcomes["slide_id"][i].as_py() for i in choose_slides(outcomes, 5)]
    assert order == ["a1", "a2", "a3", "b1", "x9"]  # abnormal first, then by score; no failed

    opened = []

    def opener(center: str, batch: str, sid: str):
        opened.append(sid)
        if sid == "b1":
            from smartccs.errors import SlideError

            raise SlideError(f"{center}/{batch}/{sid}: cannot open")
        return open_slide(path, name=sid)  # every slide is drawn from the one real file

    files = write_report(
        ev,
        tmp_path / "out",
        outcomes=outcomes,
        cells=cells,
        open_slide=opener,
        max_slides=4,
        progress=False,
    )
    # each slide is opened twice: its size for the report's one colour scale, then to draw
    assert opened == ["a1", "a2", "a3", "b1"] * 2
    out = tmp_path / "out"
    for p in (files.markdown, files.html, files.metrics, files.roc, files.confusion):
        assert p.is_file() and p.parent == out
    assert _png_size(files.roc)[0] > 300 and _png_size(files.confusion)[0] > 300
    assert json.loads(files.metrics.read_text())["groups"][0]["name"] == "overall"
    md, page = files.markdown.read_text(), files.html.read_text()
    links = {s for f in files.slides for s in (f.heatmap, f.cells) if s}
    assert "slides/A/b1/a1-heatmap.png" in links and "slides/A/b1/a1-cells.png" in links
    assert len(links) == 6  # 3 slides drawn; b1 failed to open
    for link in [*links, "roc.png", "confusion.png"]:
        assert (out / link).is_file(), link
        assert f"({link})" in md and f'"{link}"' in page
    assert "B/b2/b1: cannot open" in md  # the slide's error, in place of its figures
    assert "recall is capped by K" in md and "<script" not in page
    assert "need both classes" in page and "1.000 (1.000-1.000)" in md


def test_roc_and_confusion_figures_without_any_two_class_group(tmp_path: Path):
    slides = slides_table([("B", "b2", slide_row("b1", score=0.2))])
    ev = evaluate(slides, cells_table(), truth_table([("B", "b2", "b1", "NILM")]), None, CFG)
    assert _png_size(roc_figure({}, tmp_path / "roc.png"))[0] > 200
    matrices = {g.name: g.confusion for g in ev.groups}
    assert _png_size(confusion_figure(matrices, tmp_path / "cm.png"))[0] > 200


# --- end to end: committed tables, manifests' truth, labels/, ccs evaluate -------------------


@pytest.fixture
def screened_store(tiny_cohort: Path, local_store: Store) -> Store:
    """The tiny cohort uploaded with its cell annotations, and results written for it with
    ``write_batch_results``: scores that separate abnormal from NILM, and every annotated
    abnormal cell kept (so AP is 1 for each class present)."""
    from smartccs.labels import put_cell_labels
    from smartccs.results.tables import write_batch_results
    from smartccs.upload import upload_batch

    for center_dir in sorted(p.parent for p in tiny_cohort.glob("*/manifest.json")):
        center = center_dir.name
        ref = upload_batch(
            center_dir, center=center, batch="synth", store=local_store, progress=False
        )
        put_cell_labels(local_store, ref, center_dir / "ground_truth" / "cells.parquet")
        gt = pq.read_table(center_dir / "ground_truth" / "cells.parquet").to_pylist()
        slides, cells = [], []
        for k, s in enumerate(ref.manifest.slides):
            abnormal = s.grade != "NILM"
            slides.append(
                slide_row(
                    s.slide_id,
                    score=0.9 - 0.1 * k if abnormal else 0.1 + 0.1 * k,
                    predicted_grade=s.grade,
                    n_cells=0,
                )
            )
            mine = [r for r in gt if r["slide_id"] == s.slide_id and r["is_abnormal"]]
            for rank, r in enumerate(mine):
                cells.append(
                    cell_row(
                        s.slide_id,
                        r["class"],
                        (r["x0"], r["y0"], r["x1"], r["y1"]),
                        1.0 - rank / (len(mine) + 1),
                        rank=rank,
                    )
                )
        write_batch_results(
            local_store,
            center,
            "synth",
            "run-1",
            pa.Table.from_pylist(slides, schema=SLIDES),
            pa.Table.from_pylist(cells, schema=CELLS),
        )
    return local_store


def test_ccs_evaluate_end_to_end_on_committed_results(screened_store: Store, tmp_path: Path):
    root = screened_store.root
    out = tmp_path / "report"
    res = run_ccs("evaluate", root, "--labels", root, "--out", str(out), "--max-slides", "3")
    assert res.returncode == 0, res.stderr
    assert "AUC 1.000" in res.stdout and str(out / "report.html") in res.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    names = [g["name"] for g in metrics["groups"]]
    assert names[0] == "overall" and len(names) == 3  # overall + 2 centers
    overall = metrics["groups"][0]
    assert overall["n_slides"] == 4 and overall["binary"]["auc"] == 1.0
    assert overall["detection"]["n_slides"] == 4 and overall["detection"]["report"]["map"] == 1.0
    assert metrics["truth_source"].startswith("manifests in file://")
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert len([p for p in pngs if p.startswith("slides/")]) == 6  # 3 slides x 2 figures
    md = (out / "report.md").read_text()
    assert all(f"({p})" in md for p in pngs)

    # one center only, truth from a file: the same slides, one group besides overall
    center = names[1]
    truth = slide_truth(screened_store, [(center, "synth")])
    pq.write_table(truth, tmp_path / "truth.parquet")
    res = run_ccs(
        "evaluate",
        root,
        "--labels",
        str(tmp_path / "truth.parquet"),
        "--out",
        str(tmp_path / "r2"),
        "--center",
        center,
        "--max-slides",
        "0",
    )
    assert res.returncode == 0, res.stderr
    metrics = json.loads((tmp_path / "r2" / "metrics.json").read_text())
    assert [g["name"] for g in metrics["groups"]] == ["overall", center]
    assert not list((tmp_path / "r2").glob("slides"))

    bad = tmp_path / "bad.csv"
    bad.write_text("center,batch,slide_id,grade\nx,synth,s,NILM\nx,synth,t,cancer\n")
    res = run_ccs("evaluate", root, "--labels", str(bad), "--out", str(tmp_path / "r3"))
    assert_one_line_error(res, "bad.csv", "row 2", "grade")
    res = run_ccs(
        "evaluate", root, "--labels", root, "--out", str(tmp_path / "r4"), "--center", "nowhere"
    )
    assert_one_line_error(res, "no committed results", "nowhere")


def test_evaluate_job_config_and_run_without_ray(screened_store: Store, tmp_path: Path):
    import importlib.util

    from smartccs.evaluation.run import EvaluationJobConfig, run_evaluation_job
    from smartccs.jobrunner import load_config

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("jobs_evaluate", repo / "jobs" / "evaluate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)  # the entrypoint imports; its main() would start Ray
    demo = repo / "jobs" / "configs" / "evaluate-demo.yaml"
    cfg = load_config(EvaluationJobConfig, demo, store=screened_store.root)
    assert cfg.evaluation == EvaluationConfig() and cfg.max_slides == 50
    cfg = cfg.model_copy(
        update={
            "out": str(tmp_path / "job"),
            "max_slides": 0,
            "evaluation": EvaluationConfig(n_boot=50),
        }
    )
    result = run_evaluation_job(cfg)
    assert (tmp_path / "job" / "report.html").is_file()
    line = job.summary(result)
    assert line.startswith("evaluation: 4 slides (") and "AUC 1.000" in line and "report:" in line


def test_results_of_several_classifiers_evaluate_the_judged_batches_or_the_model_asked(
    local_store: Store, tmp_path: Path
):
    """Issue 27: ``ccs evaluate`` refused a store holding two classifiers' runs even when
    only one classifier's batches have ground truth (the others would only be counted). A
    batch's partition holds its latest committed run; batches without truth whose classifier
    is not the judged one are left out, ``--model name[/version]`` picks one classifier's
    batches, and what stays ambiguous is one error listing each classifier's batches."""
    from smartccs.evaluation.run import run_evaluation
    from smartccs.results.tables import write_batch_results

    runs = {("A", "b1"): "clf-x/v1", ("A", "b2"): "clf-x/v2", ("B", "b1"): "clf-y/v1"}
    truth = []
    for (center, batch), classifier in runs.items():
        rows = []
        for k, grade in enumerate(("HSIL", "LSIL", "NILM", "NILM")):
            sid = f"{center}{batch}s{k}"
            score = 0.9 - 0.1 * k if grade != "NILM" else 0.1 + 0.1 * k
            rows.append(slide_row(sid, score=score, classifier=classifier, run_id=batch))
            truth.append((center, batch, sid, grade))
        empty = pa.Table.from_pylist([], schema=CELLS)
        write_batch_results(local_store, center, batch, batch, slides_table_of(rows), empty)
    root = local_store.root

    def truth_csv(name: str, parts: set[tuple[str, str]]) -> str:
        lines = [",".join(t) for t in truth if (t[0], t[1]) in parts]
        (tmp_path / name).write_text("center,batch,slide_id,grade\n" + "\n".join(lines) + "\n")
        return str(tmp_path / name)

    # truth for A/b1 only: the other classifiers' batches would be skipped, so they are
    one = truth_csv("one.csv", {("A", "b1")})
    res = run_ccs("evaluate", root, "--labels", one, "--out", str(tmp_path / "r1"),
                  "--max-slides", "0")  # fmt: skip
    assert res.returncode == 0, res.stderr
    metrics = json.loads((tmp_path / "r1" / "metrics.json").read_text())
    assert metrics["model"]["classifier"] == "clf-x/v1" and metrics["partitions"] == ["A/b1"]

    every = truth_csv("all.csv", set(runs))
    res = run_ccs("evaluate", root, "--labels", every, "--out", str(tmp_path / "r2"))
    assert_one_line_error(
        res, "clf-x/v1 (A/b1), clf-x/v2 (A/b2), clf-y/v1 (B/b1)", "--model NAME[/VERSION]"
    )
    res = run_ccs("evaluate", root, "--labels", every, "--out", str(tmp_path / "r3"),
                  "--model", "clf-y", "--max-slides", "0")  # fmt: skip
    assert res.returncode == 0, res.stderr
    metrics = json.loads((tmp_path / "r3" / "metrics.json").read_text())
    assert metrics["model"]["classifier"] == "clf-y/v1" and metrics["partitions"] == ["B/b1"]

    ev = run_evaluation(local_store, tmp_path / "r4", every, model="clf-x/v2", max_slides=0,
                        cfg=CFG, progress=False)  # fmt: skip
    assert ev.partitions == ["A/b2"] and ev.overall.n_slides == 4
    with pytest.raises(EvaluationError, match=r"clf-x/v1 \(A/b1\), clf-x/v2 \(A/b2\): .*--model"):
        run_evaluation(local_store, tmp_path / "r5", every, model="clf-x", cfg=CFG)
    with pytest.raises(EvaluationError, match=r"no committed results of classifier 'nope'.*clf-y"):
        run_evaluation(local_store, tmp_path / "r6", every, model="nope", cfg=CFG)


def slides_table_of(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SLIDES)
