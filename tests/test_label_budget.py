"""The detector's label budget: a seeded, stratified subset of the training slides."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from pydantic import ValidationError

from smartccs.train.detector import DetectorConfig, label_budget


def _cohort():
    """2 centers x (3 NILM + 3 abnormal) slides, as batch refs and slide rows."""
    refs, rows = [], []
    for center in ("c1", "c2"):
        slides = [
            SimpleNamespace(slide_id=f"{center}-{i}", grade="NILM" if i < 3 else "LSIL")
            for i in range(6)
        ]
        refs.append(
            SimpleNamespace(center=center, batch="b1", manifest=SimpleNamespace(slides=slides))
        )
        rows += [{"center": center, "batch": "b1", "slide_id": s.slide_id} for s in slides]
    return refs, rows


def _ids(rows):
    return [r["slide_id"] for r in rows]


def test_budget_spans_centers_and_grades_and_is_seeded():
    refs, rows = _cohort()
    four = label_budget(rows, refs, 4, seed=0)
    assert len(four) == 4
    assert {r["center"] for r in four} == {"c1", "c2"}
    abnormal = [int(r["slide_id"].split("-")[1]) >= 3 for r in four]
    assert sum(abnormal) == 2, "one NILM and one abnormal slide per center"
    two = label_budget(rows, refs, 2, seed=0)
    assert {r["center"] for r in two} == {"c1", "c2"}, "one slide per center first"
    assert all(int(r["slide_id"].split("-")[1]) >= 3 for r in two), "abnormal slides first"
    assert _ids(label_budget(list(reversed(rows)), refs, 4, seed=0)) == _ids(four)
    assert set(_ids(four)) <= set(_ids(label_budget(rows, refs, 7, seed=0))), "nested budgets"
    assert len(label_budget(rows, refs, 99, seed=0)) == len(rows)
    others = [set(_ids(label_budget(rows, refs, 4, seed=s))) for s in range(1, 6)]
    assert any(o != set(_ids(four)) for o in others), "the seed changes the choice"


def test_detector_config_takes_a_positive_budget_or_none():
    raw = yaml.safe_load(
        (Path(__file__).parents[1] / "jobs/configs/detector-demo.yaml").read_text()
    )
    raw["store"] = {"uri": "/nonexistent"}
    assert DetectorConfig.model_validate(raw).train_slides is None
    assert DetectorConfig.model_validate(raw | {"train_slides": 3}).train_slides == 3
    with pytest.raises(ValidationError):
        DetectorConfig.model_validate(raw | {"train_slides": 0})
