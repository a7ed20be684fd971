"""Detection metrics: IoU, VOC all-point AP with greedy per-image matching, the mAP report."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smartccs.metrics.detection import (
    Boxes,
    DetectionReport,
    average_precision,
    box_iou,
    detection_report,
)

CELL = [0.0, 0.0, 10.0, 10.0]


def _dets(ids, boxes, scores) -> Boxes:
    return Boxes(np.asarray(ids), np.asarray(boxes, float).reshape(-1, 4), scores=scores)


def _gt(ids, boxes) -> Boxes:
    return Boxes(np.asarray(ids), np.asarray(boxes, float).reshape(-1, 4))


def _shift(box, dx):
    return [box[0] + dx, box[1], box[2] + dx, box[3]]


# --- box_iou -------------------------------------------------------------------------------


def test_box_iou_matches_hand_computed_overlaps():
    a = np.array([[0, 0, 2, 2], [0, 0, 1, 1]], float)
    b = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]], float)
    iou = box_iou(a, b)
    assert iou.shape == (2, 3)
    np.testing.assert_allclose(iou, [[1 / 7, 1.0, 0.0], [0.0, 0.25, 0.0]])


def test_box_iou_of_degenerate_boxes_is_zero_not_nan():
    iou = box_iou([[1, 1, 1, 1]], [[1, 1, 1, 1], [0, 0, 2, 2]])
    np.testing.assert_array_equal(iou, [[0.0, 0.0]])


def test_box_iou_handles_empty_inputs():
    assert box_iou(np.zeros((0, 4)), np.zeros((3, 4))).shape == (0, 3)


@given(
    st.lists(
        st.tuples(*[st.integers(0, 20)] * 4).map(
            lambda t: [min(t[0], t[2]), min(t[1], t[3]), max(t[0], t[2]), max(t[1], t[3])]
        ),
        min_size=1,
        max_size=6,
    )
)
def test_box_iou_is_symmetric_bounded_and_one_on_the_diagonal(boxes):
    b = np.array(boxes, float)
    iou = box_iou(b, b)
    np.testing.assert_allclose(iou, iou.T)
    assert ((iou >= 0) & (iou <= 1 + 1e-12)).all()
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    np.testing.assert_allclose(np.diag(iou)[area > 0], 1.0)


# --- average_precision ---------------------------------------------------------------------


def test_ap_worked_example_two_images_equals_hand_computed_34_over_45():
    # GT: two cells in image "a", one in "b". Ranked detections: TP, FP, TP, FP, TP.
    # precision 1, 1/2, 2/3, 2/4, 3/5 at recall 1/3, 1/3, 2/3, 2/3, 1; envelope 1, 2/3, 3/5.
    g1, g2, g3 = CELL, _shift(CELL, 50), _shift(CELL, 100)
    gt = _gt(["a", "a", "b"], [g1, g2, g3])
    det = _dets(
        ["a", "a", "b", "b", "a"],
        [g1, _shift(CELL, 200), g3, _shift(CELL, 300), g2],
        [0.9, 0.8, 0.7, 0.6, 0.5],
    )
    assert average_precision(det, gt) == pytest.approx(34 / 45)


def test_ap_accepts_plain_tuples_of_arrays():
    gt = (np.array([0]), np.array([CELL]))
    det = (np.array([0]), np.array([CELL]), np.array([0.3]))
    assert average_precision(det, gt) == 1.0


def test_ap_of_perfect_detector_is_one():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 500, size=(20, 2))
    boxes = np.hstack([xy, xy + 12])
    ids = np.repeat(np.arange(5), 4)
    assert average_precision(_dets(ids, boxes, rng.uniform(size=20)), _gt(ids, boxes)) == 1.0


def test_ap_duplicate_detection_on_one_cell_counts_one_tp_and_one_fp():
    # Ranked: TP(cell a), duplicate on a (FP), TP(cell b): precision 1, 1/2, 2/3 at recall
    # 1/2, 1/2, 1 -> AP = 1/2 * 1 + 1/2 * 2/3. Counting the duplicate as TP would give 1.
    gt = _gt([0, 1], [CELL, CELL])
    det = _dets([0, 0, 1], [CELL, _shift(CELL, 1), CELL], [0.9, 0.8, 0.7])
    assert average_precision(det, gt) == pytest.approx(5 / 6)


def test_ap_detection_never_matches_ground_truth_of_another_image():
    gt = _gt(["slide1/tile0"], [CELL])
    det = _dets(["slide1/tile1"], [CELL], [0.99])
    assert average_precision(det, gt) == 0.0


def test_ap_iou_just_below_threshold_is_fp_and_exactly_at_threshold_is_tp():
    gt = _gt([0], [CELL])
    below = _dets([0], [[0, 0, 10, 4.99]], [1.0])  # IoU 0.499
    at = _dets([0], [[0, 0, 10, 5.0]], [1.0])  # IoU 0.5
    assert average_precision(below, gt, iou_threshold=0.5) == 0.0
    assert average_precision(at, gt, iou_threshold=0.5) == 1.0
    assert average_precision(at, gt, iou_threshold=0.75) == 0.0


def test_ap_detection_falls_back_to_next_best_unmatched_ground_truth():
    # Two overlapping cells; the second detection overlaps the already-found cell most but
    # still overlaps the other one enough, so it finds that one instead of being a FP.
    g1, g2 = [0, 0, 10, 10], [2, 0, 12, 10]
    gt = _gt([0, 0], [g1, g2])
    second = [0.5, 0, 10.5, 10]  # IoU 0.90 with g1 (taken by the first), 0.74 with g2
    det = _dets([0, 0], [g1, second], [0.9, 0.8])
    iou = box_iou([second], [g1, g2])[0]
    assert iou[0] > iou[1] >= 0.5
    assert average_precision(det, gt) == 1.0


def test_ap_is_nan_without_ground_truth_and_zero_without_detections():
    no_gt = _gt(np.array([], int), np.zeros((0, 4)))
    no_det = _dets(np.array([], int), np.zeros((0, 4)), np.array([]))
    assert math.isnan(average_precision(_dets([0], [CELL], [0.5]), no_gt))
    assert math.isnan(average_precision(no_det, no_gt))
    assert average_precision(no_det, _gt([0], [CELL])) == 0.0


def test_ap_low_scored_false_positives_do_not_lower_ap():
    gt = _gt([0], [CELL])
    det = _dets([0, 0, 0], [CELL, _shift(CELL, 40), _shift(CELL, 80)], [0.9, 0.2, 0.1])
    assert average_precision(det, gt) == 1.0


def test_ap_rejects_bad_inputs_naming_the_argument():
    gt = _gt([0], [CELL])
    with pytest.raises(ValueError, match="detections must have scores"):
        average_precision(_gt([0], [CELL]), gt)
    with pytest.raises(ValueError, match="iou_threshold"):
        average_precision(_dets([0], [CELL], [1.0]), gt, iou_threshold=0.0)
    with pytest.raises(ValueError, match="same kind"):
        average_precision(_dets(["0"], [CELL], [1.0]), gt)


def _reference_ap(det_ids, det_boxes, scores, gt_ids, gt_boxes, thr):
    """Straightforward global loop, written independently of the vectorised grouping."""
    n_gt = len(gt_ids)
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable for ties
    taken = [False] * n_gt
    tp = []
    for i in order:
        best, best_j = -1.0, -1
        for j in range(n_gt):
            if gt_ids[j] != det_ids[i] or taken[j]:
                continue
            v = box_iou([det_boxes[i]], [gt_boxes[j]])[0, 0]
            if v > best:
                best, best_j = v, j
        hit = best >= thr
        if hit:
            taken[best_j] = True
        tp.append(hit)
    if not tp:
        return 0.0
    ap, n_tp, prev_recall = 0.0, 0, 0.0
    precisions = []
    recalls = []
    for k, hit in enumerate(tp, start=1):
        n_tp += hit
        precisions.append(n_tp / k)
        recalls.append(n_tp / n_gt)
    for k in range(len(tp)):
        if recalls[k] > prev_recall:
            ap += (recalls[k] - prev_recall) * max(precisions[k:])
            prev_recall = recalls[k]
    return ap


_box = st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(2, 5), st.integers(2, 5)).map(
    lambda t: [t[0] * 3.0, t[1] * 3.0, t[0] * 3.0 + t[2] * 3.0, t[1] * 3.0 + t[3] * 3.0]
)


@settings(max_examples=150, deadline=None)
@given(
    gt=st.lists(st.tuples(st.integers(0, 2), _box), min_size=1, max_size=8),
    det=st.lists(st.tuples(st.integers(0, 2), _box, st.integers(0, 5)), max_size=12),
    thr=st.sampled_from([0.3, 0.5, 0.75]),
)
def test_ap_equals_independent_reference_implementation(gt, det, thr):
    gt_ids = [g[0] for g in gt]
    gt_boxes = [g[1] for g in gt]
    det_ids = [d[0] for d in det]
    det_boxes = [d[1] for d in det]
    scores = [d[2] / 5 for d in det]
    got = average_precision(
        _dets(np.array(det_ids, int), det_boxes, scores), _gt(gt_ids, gt_boxes), thr
    )
    want = _reference_ap(det_ids, det_boxes, scores, gt_ids, gt_boxes, thr)
    assert got == pytest.approx(want, abs=1e-12)
    assert 0.0 <= got <= 1.0


@settings(max_examples=60, deadline=None)
@given(
    gt=st.lists(st.tuples(st.integers(0, 2), _box), min_size=1, max_size=6),
    det=st.lists(st.tuples(st.integers(0, 2), _box), max_size=8, unique_by=lambda d: repr(d)),
    data=st.data(),
)
def test_ap_does_not_depend_on_detection_order_when_scores_are_distinct(gt, det, data):
    n = len(det)
    scores = np.linspace(1.0, 0.1, n) if n else np.array([])
    perm = np.array(data.draw(st.permutations(range(n)))) if n else np.array([], int)
    ids = np.array([d[0] for d in det], int)
    boxes = np.array([d[1] for d in det], float).reshape(-1, 4)
    ground = _gt([g[0] for g in gt], [g[1] for g in gt])
    a = average_precision(_dets(ids, boxes, scores), ground)
    b = average_precision(_dets(ids[perm], boxes[perm], scores[perm]), ground)
    assert a == b


# --- Boxes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"image_ids": [0, 1], "boxes": [CELL]}, "boxes"),
        ({"image_ids": [0], "boxes": [[0, 0, 1]]}, "boxes"),
        ({"image_ids": [0], "boxes": [[5, 0, 1, 1]]}, "boxes"),
        ({"image_ids": [0], "boxes": [[0, 0, np.nan, 1]]}, "boxes"),
        ({"image_ids": [[0]], "boxes": [CELL]}, "image_ids"),
        ({"image_ids": [0.5], "boxes": [CELL]}, "image_ids"),
        ({"image_ids": [0], "boxes": [CELL], "labels": [0, 1]}, "labels"),
        ({"image_ids": [0], "boxes": [CELL], "labels": [-1]}, "labels"),
        ({"image_ids": [0], "boxes": [CELL], "labels": [0.5]}, "labels"),
        ({"image_ids": [0], "boxes": [CELL], "scores": [0.1, 0.2]}, "scores"),
        ({"image_ids": [0], "boxes": [CELL], "scores": [np.inf]}, "scores"),
    ],
)
def test_boxes_rejects_bad_shapes_and_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} "):
        Boxes(**kwargs)


def test_boxes_is_frozen_and_its_arrays_are_read_only():
    b = Boxes([0], [CELL], labels=[1], scores=[0.5])
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.scores = np.array([1.0])  # type: ignore[misc]
    with pytest.raises(ValueError):
        b.boxes[0, 0] = 3.0
    assert len(b) == 1


def test_boxes_accepts_empty_lists():
    b = Boxes([], [], labels=[], scores=[])
    assert len(b) == 0 and b.boxes.shape == (0, 4)


# --- detection_report ----------------------------------------------------------------------

CLASSES = ("ASC-US", "LSIL", "HSIL")


def _report_fixture() -> DetectionReport:
    # ASC-US: found perfectly. LSIL: one of two cells found, plus a box predicted as HSIL on
    # the other LSIL cell (wrong class: no match). HSIL: no ground truth at all.
    gt = Boxes(
        image_ids=[0, 0, 1],
        boxes=[CELL, _shift(CELL, 50), CELL],
        labels=[0, 1, 1],
    )
    pred = Boxes(
        image_ids=[0, 0, 1],
        boxes=[CELL, _shift(CELL, 50), CELL],
        labels=[0, 1, 2],
        scores=[0.9, 0.8, 0.7],
    )
    return detection_report(pred, gt, CLASSES)


def test_report_per_class_ap_counts_and_map_over_classes_with_ground_truth():
    r = _report_fixture()
    assert r.ap["ASC-US"] == 1.0
    assert r.ap["LSIL"] == pytest.approx(0.5)
    assert math.isnan(r.ap["HSIL"])
    assert r.map == pytest.approx(0.75)
    assert r.n_gt == {"ASC-US": 1, "LSIL": 2, "HSIL": 0}
    assert r.n_pred == {"ASC-US": 1, "LSIL": 1, "HSIL": 1}
    assert r.iou_threshold == 0.5


def test_report_to_metrics_is_flat_finite_and_skips_classes_without_ground_truth():
    m = _report_fixture().to_metrics()
    assert m == {"map50": pytest.approx(0.75), "ap50/ASC-US": 1.0, "ap50/LSIL": 0.5}
    assert all(math.isfinite(v) for v in m.values())


def test_report_to_metrics_names_keys_after_the_iou_threshold():
    gt = Boxes([0], [CELL], labels=[0])
    pred = Boxes([0], [CELL], labels=[0], scores=[1.0])
    assert detection_report(pred, gt, ["AGC"], iou_threshold=0.75).to_metrics() == {
        "map75": 1.0,
        "ap75/AGC": 1.0,
    }


def test_report_json_writes_nan_as_null_and_reads_it_back_as_nan():
    r = _report_fixture()
    text = r.model_dump_json()
    assert json.loads(text)["ap"]["HSIL"] is None
    back = DetectionReport.model_validate_json(text)
    assert math.isnan(back.ap["HSIL"])
    assert back.ap["LSIL"] == r.ap["LSIL"] and back.map == r.map


def test_report_map_is_nan_when_no_class_has_ground_truth():
    gt = Boxes([], [], labels=[])
    pred = Boxes([0], [CELL], labels=[0], scores=[1.0])
    r = detection_report(pred, gt, CLASSES)
    assert math.isnan(r.map)
    assert r.to_metrics() == {}
    assert json.loads(r.model_dump_json())["map"] is None


def test_report_is_frozen():
    r = _report_fixture()
    with pytest.raises(ValueError):
        r.map = 1.0  # type: ignore[misc]


def test_report_rejects_labels_outside_classes_and_missing_fields():
    gt = Boxes([0], [CELL], labels=[3])
    pred = Boxes([0], [CELL], labels=[0], scores=[1.0])
    with pytest.raises(ValueError, match=r"gt\.labels has class index 3"):
        detection_report(pred, gt, CLASSES)
    with pytest.raises(ValueError, match="pred must be Boxes with labels and scores"):
        detection_report(Boxes([0], [CELL], labels=[0]), Boxes([0], [CELL], labels=[0]), CLASSES)
    with pytest.raises(ValueError, match="gt must be Boxes with labels"):
        detection_report(pred, Boxes([0], [CELL]), CLASSES)
