"""Slide-level binary metrics: ROC/AUC (Mann-Whitney), thresholds, bootstrap CI, confusion."""

from __future__ import annotations

import json
import time
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from smartccs.metrics.classification import (
    BinaryReport,
    _weighted_aucs,
    binary_report,
    bootstrap_auc_ci,
    bootstrap_auc_diff_ci,
    choose_threshold,
    confusion_matrix,
    roc_auc,
    roc_curve,
    sensitivity_specificity,
    specificity_at_sensitivity,
    wilson_ci,
    within_group_auc_diff,
)
from smartccs.metrics.operating_point import min_positives, operating_point


@st.composite
def labelled_scores(draw, min_size: int = 2, max_size: int = 40, max_score: int = 8):
    """Labels with both classes, and integer-valued float scores (many ties, exact math)."""
    n = draw(st.integers(min_size, max_size))
    y = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    assume(0 < sum(y) < n)
    s = draw(st.lists(st.integers(0, max_score), min_size=n, max_size=n))
    return np.array(y), np.array(s, dtype=float)


def _brute_force_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def _separated(n_pos: int, n_neg: int, shift: float, seed: int):
    rng = np.random.default_rng(seed)
    s = np.r_[rng.normal(shift, 1.0, n_pos), rng.normal(0.0, 1.0, n_neg)]
    y = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    return y, s


# --- roc_curve / roc_auc -------------------------------------------------------------------


def test_roc_curve_has_one_point_per_distinct_score_starting_at_origin():
    y = [1, 0, 1, 0]
    s = [0.9, 0.9, 0.5, 0.1]
    fpr, tpr, thr = roc_curve(y, s)
    np.testing.assert_array_equal(thr, [np.inf, 0.9, 0.5, 0.1])
    np.testing.assert_array_equal(tpr, [0.0, 0.5, 1.0, 1.0])
    np.testing.assert_array_equal(fpr, [0.0, 0.5, 0.5, 1.0])


def test_roc_auc_hand_computed_example():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75


def test_roc_auc_counts_a_tie_between_classes_as_one_half():
    assert roc_auc([0, 1], [0.3, 0.3]) == 0.5
    assert roc_auc([False, True, True], [0.3, 0.3, 0.9]) == 0.75


def test_roc_auc_with_one_class_raises_a_clear_error():
    with pytest.raises(ValueError, match="needs both classes.*all 3 labels are positive"):
        roc_auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="all 2 labels are negative"):
        roc_curve([0, 0], [0.1, 0.2])


@given(labelled_scores())
def test_roc_auc_equals_brute_force_pairwise_mann_whitney(data):
    y, s = data
    assert roc_auc(y, s) == pytest.approx(_brute_force_auc(y, s), abs=1e-12)


@given(labelled_scores())
def test_roc_auc_equals_trapezoidal_area_under_roc_curve(data):
    y, s = data
    fpr, tpr, _ = roc_curve(y, s)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert roc_auc(y, s) == pytest.approx(np.trapezoid(tpr, fpr), abs=1e-12)


@given(labelled_scores(), st.sampled_from(["cube", "affine", "exp"]))
def test_roc_auc_is_invariant_to_strictly_increasing_transforms(data, kind):
    y, s = data
    f = {"cube": lambda x: x**3 - 4.0, "affine": lambda x: 3.0 * x + 7.0, "exp": np.exp}[kind]
    assert roc_auc(y, f(s)) == pytest.approx(roc_auc(y, s), abs=1e-12)


@given(labelled_scores())
def test_roc_auc_of_reversed_scores_is_one_minus_auc(data):
    y, s = data
    assert roc_auc(y, 1.0 - s) == pytest.approx(1.0 - roc_auc(y, s), abs=1e-12)


@pytest.mark.parametrize(
    ("y", "s", "match"),
    [
        ([0, 1, 1], [0.1, 0.2], "scores has length 2 but y_true has length 3"),
        ([0, 1], [0.1, np.nan], "scores must be finite"),
        ([0, 1], [0.1, np.inf], "scores must be finite"),
        ([0, 2], [0.1, 0.2], "y_true must hold only 0/1"),
        (["a", "b"], [0.1, 0.2], "y_true must hold 0/1 or bool"),
        ([], [], "y_true must not be empty"),
        ([[0, 1]], [[0.1, 0.2]], "y_true must be 1-D"),
        ([0, 1], ["x", "y"], "scores must be numeric"),
    ],
)
def test_inputs_are_validated_with_errors_naming_the_argument(y, s, match):
    for fn in (roc_auc, roc_curve, choose_threshold, bootstrap_auc_ci):
        with pytest.raises(ValueError, match=match):
            fn(y, s)
    with pytest.raises(ValueError, match=match):
        sensitivity_specificity(y, s, 0.5)


# --- sensitivity / specificity / thresholds ------------------------------------------------


def test_sensitivity_specificity_counts_score_equal_to_threshold_as_positive():
    y = [1, 1, 0, 0, 1]
    s = [0.9, 0.5, 0.5, 0.2, 0.1]
    assert sensitivity_specificity(y, s, 0.5) == (2 / 3, 1 / 2)
    assert sensitivity_specificity(y, s, 0.50001) == (1 / 3, 1.0)


@given(labelled_scores(), st.integers(-1, 9))
def test_sensitivity_specificity_agree_with_confusion_matrix_counts(data, threshold):
    y, s = data
    names = np.array(["NILM", "abnormal"])
    cm = confusion_matrix(names[y], names[(s >= threshold).astype(int)], list(names))
    (tn, fp), (fn, tp) = cm
    sens, spec = sensitivity_specificity(y, s, threshold)
    assert sens == tp / (tp + fn)
    assert spec == tn / (tn + fp)
    assert cm.sum() == len(y)


def test_choose_threshold_with_min_sensitivity_hand_computed():
    y = [1, 1, 1, 1, 0, 0, 0, 0]
    s = [0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1]
    assert choose_threshold(y, s, min_sensitivity=0.5) == 0.8
    assert choose_threshold(y, s, min_sensitivity=0.75) == 0.6
    assert choose_threshold(y, s, min_sensitivity=1.0) == 0.3


def test_choose_threshold_youden_hand_computed():
    y = [1, 1, 1, 1, 0, 0, 0, 0]
    s = [0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1]
    # J at 0.9: .25, 0.8: .5, 0.7: .25, 0.6: .5, 0.4: .25, 0.3: .5, ... -> highest of ties
    assert choose_threshold(y, s) == 0.8


@given(labelled_scores(), st.sampled_from([0.1, 0.5, 0.8, 0.9, 0.95, 1.0]))
def test_choose_threshold_is_highest_threshold_reaching_min_sensitivity(data, target):
    y, s = data
    t = choose_threshold(y, s, min_sensitivity=target)
    assert t in s
    assert sensitivity_specificity(y, s, t)[0] >= target
    higher = np.unique(s[s > t])
    assert all(sensitivity_specificity(y, s, h)[0] < target for h in higher)


@given(labelled_scores())
def test_choose_threshold_maximises_youden_j_over_all_observed_scores(data):
    y, s = data
    t = choose_threshold(y, s)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    j = {  # exact rationals, so ties are ties
        float(c): Fraction(int(((s >= c) & (y == 1)).sum()), n_pos)
        - Fraction(int(((s >= c) & (y == 0)).sum()), n_neg)
        for c in np.unique(s)
    }
    best = max(j.values())
    assert t == max(c for c, v in j.items() if v == best)  # the highest of tied maximisers


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_choose_threshold_rejects_min_sensitivity_outside_unit_interval(bad):
    with pytest.raises(ValueError, match="min_sensitivity must be in"):
        choose_threshold([0, 1], [0.1, 0.9], min_sensitivity=bad)


def test_specificity_at_sensitivity_hand_computed():
    y = [1, 1, 1, 1, 0, 0, 0, 0]
    s = [0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1]
    # ROC points (threshold: TP, FP): .9: 1,0  .8: 2,0  .7: 2,1  .6: 3,1  .4: 3,2  .3: 4,2 ...
    assert specificity_at_sensitivity(y, s, 0.25) == 1.0
    assert specificity_at_sensitivity(y, s, 0.5) == 1.0  # 2 of 4 caught, no NILM above 0.8
    assert specificity_at_sensitivity(y, s, 0.75) == 0.75  # at 0.6: 0.7 is the one FP
    assert specificity_at_sensitivity(y, s, 0.90) == 0.5  # all 4 (at 0.3): 0.7, 0.4 above it
    assert specificity_at_sensitivity(y, s, 0.95) == 0.5
    assert specificity_at_sensitivity(y, s, 1.0) == 0.5


def test_specificity_at_sensitivity_moves_tied_scores_together():
    # the positive at 0.5 ties a negative: catching it calls that negative positive too
    assert specificity_at_sensitivity([1, 0, 1, 0], [0.9, 0.5, 0.5, 0.1], 0.9) == 0.5
    assert specificity_at_sensitivity([1, 0, 1, 0], [0.9, 0.5, 0.5, 0.1], 0.5) == 1.0


@given(labelled_scores(), st.sampled_from([0.1, 0.5, 0.8, 0.9, 0.95, 1.0]))
def test_specificity_at_sensitivity_is_the_best_of_every_threshold_reaching_it(data, target):
    y, s = data
    spec = specificity_at_sensitivity(y, s, target)
    reaching = [c for c in np.unique(s) if sensitivity_specificity(y, s, c)[0] >= target]
    assert spec == max(sensitivity_specificity(y, s, c)[1] for c in reaching)
    t = choose_threshold(y, s, min_sensitivity=target)  # the threshold that achieves it
    assert spec == sensitivity_specificity(y, s, t)[1]


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_specificity_at_sensitivity_rejects_a_target_outside_unit_interval(bad):
    with pytest.raises(ValueError, match="target must be in"):
        specificity_at_sensitivity([0, 1], [0.1, 0.9], bad)


def test_wilson_ci_hand_computed_and_never_zero_width_at_0_or_1():
    assert wilson_ci(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    z2 = 1.959964**2
    assert wilson_ci(6, 6) == pytest.approx((1 / (1 + z2 / 6), 1.0), abs=1e-6)  # 0.610-1
    assert wilson_ci(0, 6) == pytest.approx((0.0, 1 - 1 / (1 + z2 / 6)), abs=1e-6)
    low, high = wilson_ci(8, 10, alpha=0.5)
    assert 0.4902 < low < 0.8 < high < 0.9433  # a lower level, a narrower interval
    for bad in ((11, 10), (-1, 10), (1, 0), (1.5, 10)):
        with pytest.raises(ValueError):
            wilson_ci(*bad)


# --- the operating point chosen on validation slides ----------------------------------------


def test_min_positives_is_where_a_target_first_allows_one_miss():
    assert [min_positives(t) for t in (0.5, 0.8, 0.9, 0.95, 1.0)] == [2, 5, 10, 20, 1]


def test_operating_point_reaches_the_target_sensitivity_on_the_slides_it_is_given():
    # 10 abnormal validation slides: 0.90 allows missing one, the lowest-scored (0.15)
    pos = [0.95, 0.9, 0.85, 0.8, 0.7, 0.65, 0.6, 0.5, 0.4, 0.15]
    neg = [0.75, 0.45, 0.3, 0.2, 0.1, 0.05]
    y, s = [1] * 10 + [0] * 6, pos + neg
    op = operating_point(y, s, 0.90)
    assert op.threshold == 0.4 and (op.sensitivity, op.specificity) == (0.9, 4 / 6)
    assert (op.n_slides, op.n_pos, op.n_neg, op.target_sensitivity) == (16, 10, 6, 0.9)
    assert op.resolved and op.note is None
    assert (op.sensitivity_ci_low, op.sensitivity_ci_high) == wilson_ci(9, 10)
    assert (op.specificity_ci_low, op.specificity_ci_high) == wilson_ci(4, 6)
    # a higher target moves the threshold down to the last positive
    op95 = operating_point(y, s, 0.95)
    assert op95.threshold == 0.15 and op95.sensitivity == 1.0 and op95.specificity == 2 / 6
    assert not op95.resolved and "needs 20" in op95.note


def test_operating_point_with_too_few_positives_says_the_target_is_not_resolved():
    op = operating_point([1, 1, 1, 0, 0, 0], [0.9, 0.6, 0.3, 0.5, 0.2, 0.1], 0.90)
    assert op.threshold == 0.3 and op.sensitivity == 1.0  # the lowest abnormal score
    assert not op.resolved
    assert "only 3 abnormal validation slides" in op.note and "needs 10" in op.note
    assert op.sensitivity_ci_low < 0.5  # 3 of 3 says little
    with pytest.raises(ValueError, match="needs both classes"):
        operating_point([1, 1], [0.3, 0.4], 0.9)


# --- bootstrap -----------------------------------------------------------------------------


def test_bootstrap_ci_contains_point_estimate_for_reasonable_data():
    y, s = _separated(80, 120, shift=1.0, seed=1)
    low, high = bootstrap_auc_ci(y, s, n_boot=500, seed=3)
    auc = roc_auc(y, s)
    assert low < auc < high
    assert 0.05 < high - low < 0.3


def test_bootstrap_ci_is_deterministic_for_a_seed_and_varies_across_seeds():
    y, s = _separated(30, 50, shift=0.8, seed=2)
    a = bootstrap_auc_ci(y, s, n_boot=200, seed=7)
    assert bootstrap_auc_ci(y, s, n_boot=200, seed=7) == a
    assert bootstrap_auc_ci(y, s, n_boot=200, seed=8) != a


def test_bootstrap_ci_of_perfect_separation_is_degenerate_at_one():
    assert bootstrap_auc_ci([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], n_boot=50) == (1.0, 1.0)


def test_bootstrap_ci_narrows_as_alpha_grows():
    y, s = _separated(40, 60, shift=1.0, seed=4)
    lo95, hi95 = bootstrap_auc_ci(y, s, alpha=0.05)
    lo50, hi50 = bootstrap_auc_ci(y, s, alpha=0.5)
    assert lo95 <= lo50 <= hi50 <= hi95


def test_paired_diff_ci_of_one_scoring_against_itself_is_zero():
    y, s = _separated(30, 50, shift=0.8, seed=6)
    assert bootstrap_auc_diff_ci(y, s, s) == (0.0, 0.0)


def test_paired_diff_ci_sees_a_small_consistent_gain_that_separate_cis_cannot():
    y, a = _separated(40, 60, shift=0.8, seed=7)
    b = a + 0.15 * y  # every abnormal slide a little higher: AUC up by a few hundredths
    gain = roc_auc(y, b) - roc_auc(y, a)
    lo, hi = bootstrap_auc_diff_ci(y, a, b)
    assert 0 < lo <= gain <= hi
    a_hi, b_lo = bootstrap_auc_ci(y, a)[1], bootstrap_auc_ci(y, b)[0]
    assert b_lo < a_hi, "the two separate CIs overlap: pairing is what resolves the gain"


def test_paired_diff_ci_is_antisymmetric_for_one_seed():
    y, a = _separated(20, 30, shift=0.5, seed=8)
    b = np.random.default_rng(9).normal(size=len(y)) + y
    lo, hi = bootstrap_auc_diff_ci(y, a, b, seed=3)
    assert bootstrap_auc_diff_ci(y, b, a, seed=3) == pytest.approx((-hi, -lo))


@settings(max_examples=30)
@given(labelled_scores(max_size=15), st.integers(0, 2**31 - 1))
def test_vectorised_resample_auc_equals_auc_of_materialised_resample(data, seed):
    y, s = data
    pos, neg = s[y == 1], np.sort(s[y == 0])
    rng = np.random.default_rng(seed)
    w_pos = rng.multinomial(len(pos), np.full(len(pos), 1 / len(pos)), size=5)
    w_neg = rng.multinomial(len(neg), np.full(len(neg), 1 / len(neg)), size=5)
    got = _weighted_aucs(pos, neg, w_pos, w_neg)
    for b in range(5):
        rp, rn = np.repeat(pos, w_pos[b]), np.repeat(neg, w_neg[b])
        ys = np.r_[np.ones(len(rp), int), np.zeros(len(rn), int)]
        assert got[b] == pytest.approx(roc_auc(ys, np.r_[rp, rn]), abs=1e-12)


def test_bootstrap_1000_resamples_of_1000_slides_is_fast():
    y, s = _separated(300, 700, shift=1.0, seed=5)
    t0 = time.perf_counter()
    bootstrap_auc_ci(y, s, n_boot=1000)
    # Typically ~0.1 s; the bound leaves room for a loaded 2-core CI machine.
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"n_boot": 0}, "n_boot"), ({"n_boot": 2.5}, "n_boot"), ({"alpha": 1.0}, "alpha")],
)
def test_bootstrap_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_auc_ci([0, 1], [0.1, 0.9], **kwargs)


# --- confusion_matrix ----------------------------------------------------------------------


def test_confusion_matrix_rows_are_true_and_columns_predicted_in_labels_order():
    labels = ["NILM", "LSIL", "HSIL"]
    true = ["NILM", "NILM", "LSIL", "HSIL", "HSIL", "HSIL"]
    pred = ["NILM", "LSIL", "LSIL", "LSIL", "HSIL", "HSIL"]
    cm = confusion_matrix(true, pred, labels)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 1, 0], [0, 1, 2]])
    assert cm.dtype.kind == "i"


def test_confusion_matrix_rejects_unknown_labels_and_length_mismatch():
    with pytest.raises(ValueError, match=r"pred_labels has values not in labels.*'SCC'"):
        confusion_matrix(["NILM"], ["SCC"], ["NILM", "HSIL"])
    with pytest.raises(ValueError, match="true_labels has values not in labels"):
        confusion_matrix(["AGC"], ["NILM"], ["NILM", "HSIL"])
    with pytest.raises(ValueError, match="pred_labels has length 1 but true_labels has length 2"):
        confusion_matrix(["NILM", "NILM"], ["NILM"], ["NILM"])
    with pytest.raises(ValueError, match="labels must be unique"):
        confusion_matrix(["NILM"], ["NILM"], ["NILM", "NILM"])


# --- binary_report -------------------------------------------------------------------------


def test_binary_report_fields_agree_with_the_individual_functions():
    y, s = _separated(40, 60, shift=1.2, seed=6)
    r = binary_report(y, s, 0.5, n_boot=300, seed=1)
    assert r.auc == roc_auc(y, s)
    assert (r.auc_ci_low, r.auc_ci_high) == bootstrap_auc_ci(y, s, n_boot=300, seed=1)
    assert (r.sensitivity, r.specificity) == sensitivity_specificity(y, s, 0.5)
    assert (r.n_pos, r.n_neg, r.threshold, r.ci_level) == (40, 60, 0.5, 0.95)
    assert r.auc_ci_low <= r.auc <= r.auc_ci_high
    tp, tn = round(r.sensitivity * 40), round(r.specificity * 60)
    assert (r.sensitivity_ci_low, r.sensitivity_ci_high) == wilson_ci(tp, 40)
    assert (r.specificity_ci_low, r.specificity_ci_high) == wilson_ci(tn, 60)
    assert [(x.sensitivity, x.specificity) for x in r.specificity_at] == [
        (t, specificity_at_sensitivity(y, s, t)) for t in (0.90, 0.95)
    ]


def test_binary_report_is_frozen_and_round_trips_through_json():
    r = binary_report([0, 1, 0, 1], [0.2, 0.7, 0.4, 0.6], 0.5, n_boot=20)
    with pytest.raises(ValueError):
        r.auc = 0.0  # type: ignore[misc]
    assert BinaryReport.model_validate(json.loads(r.model_dump_json())) == r


def test_binary_report_rejects_a_nan_threshold_but_takes_an_infinite_one():
    with pytest.raises(ValueError, match="threshold must be a number"):
        binary_report([0, 1], [0.1, 0.9], float("nan"), n_boot=10)
    with pytest.raises(ValueError, match="threshold must be a number"):
        binary_report([0, 1], [0.1, 0.9], "0.5", n_boot=10)
    r = binary_report([0, 1], [0.1, 0.9], float("inf"), n_boot=10)  # nothing called positive
    assert (r.sensitivity, r.specificity, r.threshold) == (0.0, 1.0, float("inf"))


def test_binary_report_calls_each_slide_at_its_own_threshold():
    y = np.array([1, 1, 0, 0, 1, 0])
    s = np.array([0.55, 0.9, 0.58, 0.1, 0.3, 0.2])
    t = np.array([0.6, 0.6, 0.6, 0.6, 0.3, 0.3])  # two centers, two thresholds
    r = binary_report(y, s, t, n_boot=50)
    # 0.55 < 0.6 is missed, 0.3 >= 0.3 is caught; 0.58 < 0.6 is cleared
    assert (r.sensitivity, r.specificity) == (2 / 3, 1.0)
    assert (r.sensitivity_ci_low, r.sensitivity_ci_high) == wilson_ci(2, 3)
    assert (r.threshold, r.threshold_min, r.threshold_max) == (None, 0.3, 0.6)
    assert sensitivity_specificity(y, s, t) == (r.sensitivity, r.specificity)
    assert r.auc == roc_auc(y, s)  # the ranking, whatever the thresholds
    assert BinaryReport.model_validate(json.loads(r.model_dump_json())) == r
    same = binary_report(y, s, np.full(6, 0.5), n_boot=50)
    assert same == binary_report(y, s, 0.5, n_boot=50)  # one threshold, however given
    assert (same.threshold, same.threshold_min, same.threshold_max) == (0.5, 0.5, 0.5)


def test_per_slide_thresholds_of_the_wrong_length_or_with_nan_are_refused():
    y, s = [0, 1, 0, 1], [0.2, 0.7, 0.4, 0.6]
    with pytest.raises(ValueError, match=r"one number or one per slide \(4\), got shape \(3,\)"):
        binary_report(y, s, [0.5, 0.5, 0.5], n_boot=10)
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        binary_report(y, s, [[0.5, 0.5], [0.5, 0.5]], n_boot=10)
    with pytest.raises(ValueError, match=r"for every slide, got NaN at position\(s\) \[2\]"):
        binary_report(y, s, [0.5, 0.5, float("nan"), 0.5], n_boot=10)
    with pytest.raises(ValueError, match="threshold must be a number"):
        sensitivity_specificity(y, s, [0.5, None, 0.5, 0.5])


def test_a_report_of_an_older_version_without_the_threshold_range_still_loads():
    r = binary_report([0, 1, 0, 1], [0.2, 0.7, 0.4, 0.6], 0.5, n_boot=20)
    old = r.model_dump(exclude={"threshold_min", "threshold_max"})
    loaded = BinaryReport.model_validate(old)
    assert loaded.threshold == 0.5 and loaded.threshold_min is None


def test_within_group_gain_of_one_group_is_the_paired_diff_and_its_ci():
    y, a = _separated(30, 40, shift=0.6, seed=10)
    b = a + 0.2 * y
    gain, lo, hi = within_group_auc_diff(["c"] * len(y), y, a, b, seed=5)
    assert gain == pytest.approx(roc_auc(y, b) - roc_auc(y, a))
    assert (lo, hi) == pytest.approx(bootstrap_auc_diff_ci(y, a, b, seed=5))


def test_moving_centers_apart_changes_pooled_auc_but_not_the_within_center_gain():
    y1, a1 = _separated(20, 30, shift=1.0, seed=11)
    y2, a2 = _separated(20, 30, shift=1.0, seed=12)
    y, a = np.r_[y1, y2], np.r_[a1, a2]
    groups = ["ext-a"] * len(y1) + ["ext-b"] * len(y2)
    b = a + np.r_[np.zeros(len(y1)), np.full(len(y2), 3.0)]  # one center's scores all higher
    assert roc_auc(y, b) != pytest.approx(roc_auc(y, a))
    assert within_group_auc_diff(groups, y, a, b) == (0.0, 0.0, 0.0)


def test_within_group_gain_names_a_group_without_both_classes():
    y = np.array([1, 0, 1, 1])
    with pytest.raises(ValueError, match="group ext-b"):
        within_group_auc_diff(["ext-a", "ext-a", "ext-b", "ext-b"], y, y * 1.0, y * 1.0)
