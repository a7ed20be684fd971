"""Rows for the result tables' tests: one screened and one failed slide, and their cells."""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa

from smartccs.results.schema import CELLS, PROB_COLUMNS, SLIDES
from smartccs.results.tables import write_batch_results
from smartccs.store import Store

AT = datetime(2026, 11, 21, 9, 30, tzinfo=UTC)


def slide_rows(run_id: str, screened: str = "s1", failed: str = "s2", score: float = 0.75):
    """One screened slide (positive, with probabilities) and one failed slide (nulls, an error)."""
    probs = dict(zip(PROB_COLUMNS, [1 - score, score, 0, 0, 0, 0, 0], strict=True))
    common = {c: None for c in SLIDES.names} | {"run_id": run_id, "screened_at": AT}
    return pa.Table.from_pylist(
        [
            common
            | probs
            | {
                "slide_id": screened,
                "status": "screened",
                "score": score,
                "predicted_grade": "ASC-US",
                "threshold": 0.5,
                "positive": score >= 0.5,
                "n_tiles": 40,
                "tiles_read": 40,
                "tiles_failed": 0,
                "n_cells": 3,
                "n_squamous": 12000,
                "adequate": True,
                "slide_mpp": 0.25,
                "detector": "det/1",
                "classifier": "mil/1",
                "encoder": "dino/1",
            },
            common
            | {"slide_id": failed, "status": "failed", "error": "no mpp in the file or manifest"},
        ],
        schema=SLIDES,
    )


def cell_rows(run_id: str, slide_id: str = "s1", n: int = 3) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "slide_id": slide_id,
                "run_id": run_id,
                "cell_class": "ASC-US",
                "rank": i,
                "score": 0.9 - i / 10,
                "x0": 100.0 * i,
                "y0": 50.0,
                "x1": 100.0 * i + 40,
                "y1": 90.0,
                "width_um": 10.0,
                "height_um": 10.0,
            }
            for i in range(n)
        ],
        schema=CELLS,
    )


def write(store: Store, center: str = "hospital-a", batch: str = "b1", run: str = "run-1", **kw):
    return write_batch_results(store, center, batch, run, slide_rows(run, **kw), cell_rows(run))
