"""The hue rotation the synthesizer uses to make a center and the augmentations use to undo it."""

import numpy as np
import pytest

from smartccs.stain import (
    StainReference,
    StainStats,
    calibrate,
    calibration,
    grey_axis_rotation,
    hue_difference,
    merge_stats,
    stain_stats,
)
from smartccs.synth.profiles import StainProfile
from smartccs.synth.render import stain_matrix


@pytest.mark.parametrize("angle", [-28.0, 7.5, 90.0])
def test_hue_rotation_is_a_rotation_that_keeps_glass_and_total_absorbance(angle):
    r = grey_axis_rotation(angle)
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(r) == pytest.approx(1.0)
    np.testing.assert_allclose(r @ np.ones(3), np.ones(3), atol=1e-12)  # grey stays grey
    od = np.array([0.6, 0.9, 0.3])
    assert (r @ od).sum() == pytest.approx(od.sum())  # same absorbance, other hue
    assert not np.allclose(r @ od, od)
    np.testing.assert_allclose(grey_axis_rotation(angle) @ grey_axis_rotation(-angle), np.eye(3),
                               atol=1e-12)  # fmt: skip


def test_a_centers_hue_shift_is_that_rotation_of_its_stain_vectors():
    base = StainProfile()
    shifted = base.model_copy(update={"hue_shift_deg": 22.0, "saturation": 1.0})
    plain = stain_matrix(base.model_copy(update={"saturation": 1.0}))
    turned = plain @ grey_axis_rotation(22.0).T
    assert (turned < 0).any()  # a dye turned past an axis: no negative absorbance is rendered
    np.testing.assert_allclose(stain_matrix(shifted), np.maximum(turned, 0), rtol=1e-5, atol=1e-6)


def _smear(turn_deg: float = 0.0, strength: float = 1.0, seed: int = 0) -> np.ndarray:
    """Pixels of two dyes on either side of grey (a nuclear blue, a pink) on bluish glass."""
    rng = np.random.default_rng(seed)
    dyes = np.array([[0.65, 0.70, 0.29], [0.10, 0.95, 0.30]]) @ grey_axis_rotation(turn_deg).T
    amount = rng.gamma(2.0, 0.25, size=(60_000, 2)) * (rng.random((60_000, 1)) < 0.4)
    glass = np.array([236.0, 234.0, 240.0])
    rgb = (glass + 1) * np.exp(-strength * amount @ dyes) - 1
    return np.clip(np.rint(rgb + rng.normal(0, 1.0, rgb.shape)), 0, 255).astype(np.uint8)


def test_stain_stats_read_a_centers_hue_turn_and_strength_and_ignore_its_glass():
    base, other = stain_stats(_smear()), stain_stats(_smear(18.0, 1.3, seed=1))
    assert base.glass == pytest.approx((236, 234, 240), abs=2)
    assert hue_difference(other.hue_deg, base.hue_deg) == pytest.approx(18.0, abs=2.0)
    assert other.density / base.density == pytest.approx(1.3, rel=0.08)
    assert other.saturation == pytest.approx(base.saturation, rel=0.05)
    with pytest.raises(ValueError, match="too little stain"):
        stain_stats(np.full((4, 32, 32, 3), 240, np.uint8))


def test_merged_measurements_weigh_by_pixels_and_average_hue_across_the_wrap():
    a = StainStats(glass=(230, 230, 230), hue_deg=85.0, density=0.3, saturation=0.5, pixels=300)
    b = a.model_copy(
        update={"hue_deg": -85.0, "density": 0.6, "glass": (250, 250, 250), "pixels": 100}
    )
    m = merge_stats(a, b)
    assert m.pixels == 400 and m.glass == pytest.approx((235, 235, 235))
    assert abs(hue_difference(m.hue_deg, 87.5)) < 1e-9  # across +-90, not through 0
    assert 0.3 < m.density < 0.6 and merge_stats(None, b) == b


def test_a_center_inside_the_training_range_is_left_alone_one_outside_is_brought_into_it():
    reference = StainReference(
        centers={"a": stain_stats(_smear(seed=2)), "b": stain_stats(_smear(3.0, 1.05, seed=3))}
    )
    inside = _smear(1.5, 1.02, seed=4)
    assert calibration(reference, stain_stats(inside)).identity
    assert calibrate(inside, calibration(reference, stain_stats(inside))) is inside
    outside = _smear(-20.0, 1.35, seed=5)
    cal = calibration(reference, stain_stats(outside))
    assert 15 < cal.hue_deg < 22 and 0.7 < cal.density_scale < 0.8, cal
    after = calibrate(outside, cal)
    assert after.dtype == np.uint8 and after.shape == outside.shape
    again = calibration(reference, stain_stats(after))  # now at the range's edge: little left
    assert abs(again.hue_deg) < 1.5 and abs(np.log(again.density_scale)) < 0.03, again
