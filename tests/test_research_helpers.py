"""The research scripts' own helpers (research/, not part of the library)."""

from __future__ import annotations

import sys
from pathlib import Path

from smartccs.labels import has_cell_labels
from smartccs.store import Store, StoreConfig

sys.path.insert(0, str(Path(__file__).parents[1] / "research"))
from study_helpers import generated_batches


def test_generated_batches_are_made_and_uploaded_once_with_their_labels(tmp_path: Path):
    store = Store(StoreConfig(uri=str(tmp_path / "store")))
    out = tmp_path / "extra"
    args = (store, out, ["int-b"], 1, "tiny", 3, "holdout")
    assert generated_batches(*args) == ["int-b/holdout"]
    assert has_cell_labels(store, "int-b", "holdout")
    slide = next(out.glob("int-b/slides/*"))
    mtime = slide.stat().st_mtime_ns
    assert generated_batches(*args) == ["int-b/holdout"]  # a re-run reuses both
    assert slide.stat().st_mtime_ns == mtime
    assert generated_batches(store, out, [], 1, "tiny", 3, "holdout") == []
