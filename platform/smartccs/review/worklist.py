"""What a reviewer's page shows, read from the store: a center's worklist and one slide.

Everything comes from committed data: the ``slides`` and ``cells`` result tables, the
``reviews`` table (smartccs.results.reviews) and the committed batch itself. A center sees only
its own rows: every read here is filtered by the center the token names.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from smartccs.batches import is_committed
from smartccs.errors import CCSError
from smartccs.ids import validate_id
from smartccs.results.reviews import current_reviews, read_reviews
from smartccs.results.tables import read_table
from smartccs.store import Store
from smartccs.taxonomy import ABNORMAL_CLASSES

UNREVIEWED = "unreviewed"
REVIEWED = "reviewed"


class NotFound(CCSError):
    """A batch or slide the center does not have (the web layer answers 404)."""


class WorkItem(BaseModel):
    """One slide on the worklist."""

    model_config = ConfigDict(extra="forbid")

    batch: str
    slide_id: str
    status: str = Field(description="screened / inadequate / rejected / failed")
    score: float | None
    predicted_grade: str | None
    positive: bool | None
    threshold: float | None
    n_cells: int | None
    screened_at: datetime
    review: str = Field(description=f"{UNREVIEWED} or {REVIEWED}")
    category: str | None = Field(default=None, description="the current sign-off's category")
    reviewer: str | None = None
    reviewed_at: datetime | None = None


class CellBox(BaseModel):
    """A kept cell of the ``cells`` table, as the gallery and the viewer draw it."""

    model_config = ConfigDict(extra="forbid")

    cell_class: str
    rank: int
    score: float
    x0: float
    y0: float
    x1: float
    y1: float


def _by_slide(table: pa.Table) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["batch"], r["slide_id"]): r for r in table.to_pylist()}


def worklist(store: Store, center: str) -> list[WorkItem]:
    """The center's screened slides, newest batch first, with each one's review state."""
    slides = read_table(store, "slides", centers=[center])
    reviews = _by_slide(current_reviews(store, centers=[center]))
    items = []
    for r in slides.to_pylist():
        review = reviews.get((r["batch"], r["slide_id"]))
        items.append(
            WorkItem(
                batch=r["batch"],
                slide_id=r["slide_id"],
                status=r["status"],
                score=r["score"],
                predicted_grade=r["predicted_grade"],
                positive=r["positive"],
                threshold=r["threshold"],
                n_cells=r["n_cells"],
                screened_at=r["screened_at"],
                review=REVIEWED if review else UNREVIEWED,
                category=review["category"] if review else None,
                reviewer=review["reviewer"] if review else None,
                reviewed_at=review["reviewed_at"] if review else None,
            )
        )
    return sorted(items, key=lambda i: (i.screened_at, i.batch, i.slide_id), reverse=True)


def batch_rows(store: Store, center: str, batch: str, table: str) -> pa.Table:
    """The committed rows of result ``table`` for the center's ``batch``, or NotFound for an
    id that is no id, or a batch that is not the center's committed one."""
    try:
        validate_id(batch, "batch")
    except ValueError:
        raise NotFound(f"no batch {batch!r}") from None
    if not is_committed(store, center, batch):
        raise NotFound(f"no committed batch {batch!r} of {center}")
    return read_table(store, table, centers=[center], batches=[batch])


def of_slide(rows: pa.Table, slide_id: str) -> pa.Table:
    """The rows of one slide."""
    return rows.filter(pc.equal(rows["slide_id"], slide_id))


def slide_row(slides: pa.Table, slide_id: str) -> dict[str, Any]:
    """The slide's row among a batch's ``slides`` rows, or NotFound."""
    rows = of_slide(slides, slide_id).to_pylist()
    if not rows:
        raise NotFound(f"no screened slide {slide_id!r} in this batch")
    return rows[0]


def slide_cells(cells: pa.Table, slide_id: str) -> list[CellBox]:
    """The slide's kept cells among a batch's ``cells`` rows, by class in taxonomy order,
    best first."""
    order = {c: i for i, c in enumerate(ABNORMAL_CLASSES)}
    boxes = [
        CellBox(**{k: c[k] for k in CellBox.model_fields})
        for c in of_slide(cells, slide_id).to_pylist()
    ]
    return sorted(boxes, key=lambda b: (order.get(b.cell_class, len(order)), b.rank))


def slide_reviews(store: Store, center: str, batch: str, slide_id: str) -> list[dict[str, Any]]:
    """The slide's sign-offs, oldest first: its history (the last is the current one)."""
    rows = read_reviews(store, centers=[center], batches=[batch])
    return [r for r in rows.to_pylist() if r["slide_id"] == slide_id]
