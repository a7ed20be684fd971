"""Issue 29's acceptance: ``ccs models import`` of the Smart-CCS release (toy-sized, random
weights, in the published formats), then ``ccs screen`` with the classifier it composes, end to
end on a synthetic batch: the reference's Deformable DETR finds cells on 1200 px tiles, they are
cut the reference's way, embedded by the imported encoder and graded by MeanMIL, the head adapted
with smartccs adaptation against the imported prototype bank (one run: the adapted path holds
the plain one; the platform's own classifiers pin that one without adaptation)."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from smartccs.models.artifacts import latest_version
from smartccs.results.tables import read_table
from smartccs.store import Store, StoreConfig
from smartccs.taxonomy import ABNORMAL_CLASSES
from smartccs.upload import upload_batch
from tests.published_release import write_release

sys.path.insert(0, str(Path(__file__).parent))
from cli import assert_one_line_error, run_ccs

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("ray_session")]


def test_the_imported_release_screens_a_batch_end_to_end(tiny_cohort: Path, tmp_path: Path):
    import ray

    store = Store(StoreConfig(uri=str(tmp_path / "store")))
    root = store.config.uri
    files = write_release(tmp_path / "release")
    flags = [str(v) for k, p in files.items() for v in (k, p)]
    res = run_ccs("models", "import", *flags, "--name", "ccs", "--store", root, "--json")
    assert res.returncode == 0, res.stderr
    refs = {d["role"]: d["ref"] for d in json.loads(res.stdout)["imported"]}
    assert set(refs) == {"encoder", "slide_head", "prototypes", "cell_detector", "classifier"}

    batch = sorted(p.parent for p in tiny_cohort.glob("*/manifest.json"))[0]
    upload_batch(batch, center="c1", batch="b1", store=store, progress=False)
    address = ray.get_runtime_context().gcs_address
    common = ("--batch", "c1/b1", "--model", "ccs-classifier", "--store", root,
              "--min-squamous", "1", "--address", address)  # fmt: skip
    res = run_ccs("screen", *common, "--run-id", "imported", "--adapt", "smartccs")
    assert res.returncode == 0, res.stderr
    slides = read_table(store, "slides").to_pylist()
    assert slides and {s["run_id"] for s in slides} == {"imported"}
    for s in slides:
        assert s["status"] == "screened", s
        assert (s["classifier"], s["encoder"], s["detector"]) == (
            refs["classifier"], refs["encoder"], refs["cell_detector"]
        )  # fmt: skip
        assert 0 <= s["score"] <= 1 and s["threshold"] == 0.5 and s["n_cells"] > 0
        assert s["adaptation"].startswith("smartccs:adapt-c1/"), "adapted with the bank"
    assert latest_version(store, "adapt-c1")
    cells = read_table(store, "cells").to_pylist()
    assert cells and {c["cell_class"] for c in cells} <= set(ABNORMAL_CLASSES)
    assert all(c["x1"] > c["x0"] and c["y1"] > c["y0"] for c in cells)
    per_class = Counter((c["slide_id"], c["cell_class"]) for c in cells)
    assert max(per_class.values()) <= 4, "top 4 per class (the toy release's top_k)"

    refused = run_ccs("screen", *common[:-2], "--adapt", "tent")  # no Ray: refused before
    assert_one_line_error(refused, "imported Deformable DETR", "tent")
