"""The ``reviews`` table: cytologists' sign-offs, one Parquet file per review, append-only.

A cytologist signs a slide out in the workstation; each sign-off is one row, written as a file
of its own, ``results/reviews/center=<c>/batch=<b>/<review_id>.parquet``. Nothing is ever
replaced or deleted: the history of a slide is its rows, and the latest (``reviewed_at``) is the
current one (:func:`current_reviews`). Each file is written create-if-absent in one atomic step
(one S3 PUT; locally a hidden staging file linked into place), so a crash leaves nothing a
reader would read, and retries of one sign-off, however they race, are one file and one row.
The folder is plain Hive-partitioned Parquet like slides and cells: DuckDB, polars, pandas and
pyarrow read it as is.

:class:`ReviewSubmission` is what the workstation posts; :class:`Review` is the row, the
submission plus what the server knows (who, when, the id, which run was reviewed).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)

from smartccs import layout
from smartccs.batches import BatchRef, load_batch
from smartccs.errors import CCSError
from smartccs.ids import ID_PATTERN, Id
from smartccs.labels import (
    BOX_COLUMNS,
    REQUIRED,
    LabelsError,
    has_cell_labels,
    load_cell_labels,
    put_cell_labels,
)
from smartccs.metrics.detection import box_iou
from smartccs.results.schema import (
    CORRECTION_VERDICTS,
    NOT_A_CELL,
    REVIEW_CATEGORIES,
    REVIEWS,
    REVIEWS_SCHEMA_VERSION,
    REVIEWS_TABLE,
)
from smartccs.results.tables import ResultsError, _output_schema, _selection, _to_parquet
from smartccs.store import Store
from smartccs.taxonomy import ABNORMAL_CLASSES

MAX_COMMENT = 2000
MAX_CORRECTIONS = 1000
MAX_REVIEWER = 200
SUPERSEDE_IOU = 0.5
"""A reviewed box replaces an annotation of the same slide it overlaps this much: the
reviewer's verdict on that cell is the latest word (``not_a_cell`` removes it)."""

_ID = ID_PATTERN
_FILE_RE = re.compile(
    rf"center=(?P<center>{_ID})/batch=(?P<batch>{_ID})/(?P<review_id>{_ID})\.parquet"
)
"""A review file's key relative to the table's folder; staging files (``.name.tmp-<hex>``)
do not match."""
_READERS = 8
"""Files read at once: a batch's reviews are many small objects, one GET each on S3."""

LABEL_SCHEMA = pa.schema([*REQUIRED.items(), *((c, pa.float64()) for c in BOX_COLUMNS)])
"""The columns of ``labels/<center>/<batch>/cells.parquet`` (``smartccs.labels``)."""


def _one_of(allowed: tuple[str, ...]) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"{value!r} is not one of {', '.join(allowed)}")
        return value

    return check


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


Category = Annotated[
    str,
    AfterValidator(_one_of(REVIEW_CATEGORIES)),
    Field(json_schema_extra={"enum": list(REVIEW_CATEGORIES)}),
]
CellClass = Annotated[
    str,
    AfterValidator(_one_of(ABNORMAL_CLASSES)),
    Field(json_schema_extra={"enum": list(ABNORMAL_CLASSES)}),
]
Verdict = Annotated[
    str,
    AfterValidator(_one_of(CORRECTION_VERDICTS)),
    Field(json_schema_extra={"enum": list(CORRECTION_VERDICTS)}),
]
Coordinate = Annotated[float, Field(allow_inf_nan=False, description="level-0 px")]


class CellCorrection(BaseModel):
    """A reviewer's verdict on one row of the slide's ``cells`` table, named by its class,
    rank and box as the workstation showed them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cell_class: CellClass
    rank: int = Field(ge=0, le=32767)
    x0: Coordinate
    y0: Coordinate
    x1: Coordinate
    y1: Coordinate
    verdict: Verdict

    @field_validator("x1", "y1")
    @classmethod
    def _not_empty(cls, value: float, info: ValidationInfo) -> float:
        start = f"{info.field_name[0]}0"
        if start in info.data and value <= info.data[start]:
            raise ValueError(f"must be greater than {start} ({info.data[start]}): an empty box")
        return value


class ReviewSubmission(BaseModel):
    """What a cytologist posts when signing a slide out (the workstation's request body)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    slide_id: Id
    category: Category
    comment: str | None = Field(default=None, max_length=MAX_COMMENT)
    corrections: list[CellCorrection] = Field(default_factory=list, max_length=MAX_CORRECTIONS)

    @field_validator("corrections")
    @classmethod
    def _each_cell_once(cls, value: list[CellCorrection]) -> list[CellCorrection]:
        seen: set[tuple[str, int]] = set()
        for c in value:
            if (c.cell_class, c.rank) in seen:
                raise ValueError(f"{c.cell_class} cell of rank {c.rank} corrected twice")
            seen.add((c.cell_class, c.rank))
        return value


class Review(ReviewSubmission):
    """One row of the ``reviews`` table: a submission and what the server fills in."""

    center: Id
    batch: Id
    review_id: Id
    reviewer: str = Field(min_length=1, max_length=MAX_REVIEWER, pattern=r"^[^\x00-\x1f\x7f]+$")
    reviewed_at: Annotated[AwareDatetime, AfterValidator(_utc)]
    run_id: str | None = Field(default=None, description="the screening run reviewed")
    classifier: str | None = None
    detector: str | None = None
    encoder: str | None = None
    adaptation: str | None = None
    score: float | None = Field(
        default=None, ge=0, le=1, allow_inf_nan=False, description="the slide score shown"
    )

    @classmethod
    def of(cls, submission: ReviewSubmission, **server: object) -> Review:
        """The row of ``submission`` signed by the server (center, batch, reviewer, ...)."""
        return cls.model_validate(submission.model_dump() | server)


# --- writes ---------------------------------------------------------------------------------
def review_key(review: Review) -> str:
    """Where ``review`` is stored: named by its id alone, so a retry (the same id, stamped
    again by the server) lands on the same key and create-if-absent makes it one file,
    however the retries race."""
    return (
        f"{layout.results(REVIEWS_TABLE, review.center, review.batch)}/{review.review_id}.parquet"
    )


_SIGN_OFF = {"slide_id", "reviewer", "category", "comment", "corrections"}
"""What makes two writes of one review id the same sign-off (the server's stamps aside)."""


class ReviewConflict(CCSError):
    """A review id already holds another sign-off (an ``Idempotency-Key`` used twice)."""


def append_review(store: Store, review: Review) -> str:
    """Append one sign-off to the reviews table; the key of its file.

    Written create-if-absent in one atomic step. A ``review_id`` already written with the same
    sign-off (a retried submission, stamped again by the server) keeps its file and adds no
    row; one written with another sign-off is a ``ReviewConflict``, never a silent drop."""
    key = review_key(review)
    store.check_key(key)
    data = review.model_dump()
    row = pa.Table.from_pylist([{name: data[name] for name in REVIEWS.names}], schema=REVIEWS)
    if store.put_if_absent(key, _to_parquet(row)):
        return key
    (row,) = _read_file(store, review.center, review.batch, key).to_pylist()
    stored = Review.model_validate({k: v for k, v in row.items() if v is not None})
    if stored.model_dump(include=_SIGN_OFF) != review.model_dump(include=_SIGN_OFF):
        raise ReviewConflict(
            f"review id {review.review_id!r} already holds another sign-off of batch "
            f"{review.batch!r}: send a new id for a new sign-off"
        )
    return key


# --- reads ----------------------------------------------------------------------------------
def _review_files(
    store: Store, centers: Iterable[str] | None, batches: Iterable[str] | None
) -> list[tuple[str, str, str]]:
    """(center, batch, key) of every review file of the selected partitions."""
    want_centers, want_batches = _selection(centers), _selection(batches)
    base = f"results/{REVIEWS_TABLE}"
    prefixes = [base]
    if want_centers is not None and want_batches is not None:  # list just those partitions
        prefixes = [
            layout.results(REVIEWS_TABLE, c, b)
            for c in sorted(want_centers)
            for b in sorted(want_batches)
        ]
    found = []
    for key in (k for p in prefixes for k in store.list(p)):
        m = _FILE_RE.fullmatch(key.removeprefix(f"{base}/"))
        if m is None:
            continue
        if want_centers is not None and m["center"] not in want_centers:
            continue
        if want_batches is not None and m["batch"] not in want_batches:
            continue
        found.append((m["center"], m["batch"], key))
    return found


def _read_file(store: Store, center: str, batch: str, key: str) -> pa.Table:
    """One review file with its partition columns, in this version's columns."""
    found = pq.read_table(pa.BufferReader(store.read_bytes(key)))
    version = (found.schema.metadata or {}).get(b"smartccs.schema_version", b"?").decode()
    if version.split(".")[0] != REVIEWS_SCHEMA_VERSION.split(".")[0]:
        raise ResultsError(
            f"{store.uri(key)} holds reviews schema {version}; this smartccs reads "
            f"{REVIEWS_SCHEMA_VERSION}: read it with a matching smartccs"
        )
    n = found.num_rows
    columns = [pa.chunked_array([pa.repeat(pa.scalar(v, pa.string()), n)]) for v in (center, batch)]
    for field in REVIEWS:
        if field.name in found.column_names:  # an older minor version may lack a column
            columns.append(found[field.name].cast(field.type))
        elif field.nullable:
            columns.append(pa.chunked_array([pa.nulls(n, field.type)]))
        else:
            raise ResultsError(f"{store.uri(key)} lacks the non-nullable column {field.name!r}")
    return pa.Table.from_arrays(columns, schema=_output_schema(REVIEWS))


def _latest_per(table: pa.Table, columns: tuple[str, ...]) -> pa.Table:
    """The last row of each value of ``columns``, in the table's order."""
    chosen: dict[tuple, int] = {}
    for i, key in enumerate(zip(*(table[c].to_pylist() for c in columns), strict=True)):
        chosen[key] = i
    return table.take(pa.array(sorted(chosen.values()), pa.int64()))  # typed: none may be chosen


def read_reviews(
    store: Store, centers: Iterable[str] | None = None, batches: Iterable[str] | None = None
) -> pa.Table:
    """Every review of the selected partitions, oldest first: ``center``, ``batch``, then the
    schema's columns (one file per review: a review is never two rows, ``review_key``)."""
    files = _review_files(store, centers, batches)
    if not files:
        return _output_schema(REVIEWS).empty_table()
    with ThreadPoolExecutor(_READERS) as pool:
        parts = list(pool.map(lambda f: _read_file(store, *f), files))
    order = [(c, "ascending") for c in ("reviewed_at", "center", "batch", "review_id")]
    return pa.concat_tables(parts).sort_by(order)


def current_reviews(
    store: Store, centers: Iterable[str] | None = None, batches: Iterable[str] | None = None
) -> pa.Table:
    """Each reviewed slide's current review: the latest row of its (center, batch, slide_id)."""
    return _latest_per(read_reviews(store, centers, batches), ("center", "batch", "slide_id"))


# --- reviewed cells as cell labels ----------------------------------------------------------
def _label_table(rows: list[tuple]) -> pa.Table:
    """Rows ``(slide_id, class, x0, y0, x1, y1)`` as a labels table."""
    columns = list(zip(*rows, strict=True)) if rows else [[] for _ in LABEL_SCHEMA]
    return pa.Table.from_arrays(
        [pa.array(v, f.type) for v, f in zip(columns, LABEL_SCHEMA, strict=True)],
        schema=LABEL_SCHEMA,
    )


def _corrected_cells(store: Store, center: str, batch: str) -> pa.Table:
    """The cells corrected in the batch's current reviews, as label rows whose ``class`` is the
    verdict (``not_a_cell`` included)."""
    current = current_reviews(store, [center], [batch])
    rows = [
        (slide_id, c["verdict"], *(c[k] for k in BOX_COLUMNS))
        for slide_id, cells in zip(
            current["slide_id"].to_pylist(), current["corrections"].to_pylist(), strict=True
        )
        for c in cells or ()
    ]
    return _label_table(rows)


def _abnormal(cells: pa.Table) -> pa.Table:
    return cells.filter(pc.not_equal(cells["class"], NOT_A_CELL))


def reviewed_cell_labels(store: Store, center: str, batch: str) -> pa.Table:
    """Label rows (``slide_id, class, x0, y0, x1, y1``) of the cells corrected in the batch's
    current reviews: each cell under the class its reviewer gave it; ``not_a_cell`` ones left
    out."""
    return _abnormal(_corrected_cells(store, center, batch))


def _boxes(table: pa.Table) -> np.ndarray:
    return np.stack([table[c].to_numpy() for c in BOX_COLUMNS], axis=1).reshape(-1, 4)


def merge_reviewed_cells(existing: pa.Table, corrected: pa.Table) -> tuple[pa.Table, int]:
    """``existing`` annotations with the ``corrected`` cells (label rows, ``not_a_cell``
    included) merged in, and how many annotations they superseded.

    An annotation a corrected cell of the same slide overlaps at IoU >= 0.5 goes (a
    ``not_a_cell`` verdict removes it, a class replaces it, so exporting twice changes
    nothing); every other annotation stays, and the abnormal corrected cells are added.
    """
    existing, corrected = existing.cast(LABEL_SCHEMA), corrected.cast(LABEL_SCHEMA)
    keep = np.ones(existing.num_rows, dtype=bool)
    old_slides = np.asarray(existing["slide_id"].to_pylist(), dtype=object)
    new_slides = np.asarray(corrected["slide_id"].to_pylist(), dtype=object)
    old_boxes, new_boxes = _boxes(existing), _boxes(corrected)
    for slide in set(new_slides) & set(old_slides):
        mine = np.flatnonzero(old_slides == slide)
        iou = box_iou(old_boxes[mine], new_boxes[new_slides == slide])
        keep[mine[(iou >= SUPERSEDE_IOU).any(axis=1)]] = False
    merged = pa.concat_tables([existing.filter(pa.array(keep)), _abnormal(corrected)])
    return merged, int((~keep).sum())


def _annotations(store: Store, ref: BatchRef) -> pa.Table | None:
    """The batch's published cell annotations as label rows; None if it has none."""
    if not has_cell_labels(store, ref.center, ref.batch):
        return None
    by_slide = load_cell_labels(store, [ref])
    rows = [
        (slide_id, cls, *box)
        for (_, _, slide_id), s in by_slide.items()
        for cls, box in zip(s.classes.tolist(), s.boxes.tolist(), strict=True)
    ]
    return _label_table(rows)


class LabelsExport(BaseModel):
    """What :func:`export_reviewed_labels` wrote."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str = Field(description="the labels file written: a store URI or a local path")
    rows: int = Field(ge=0, description="cell labels in it")
    reviewed: int = Field(ge=0, description="of them, cells from reviews")
    superseded: int = Field(ge=0, description="earlier annotations a reviewed cell replaced")


def export_reviewed_labels(
    store: Store, center: str, batch: str, out: str | Path | None = None
) -> LabelsExport:
    """The batch's annotations merged with its reviewed cells (:func:`merge_reviewed_cells`),
    published as its labels (atomically, as ``ccs labels`` does) or written to ``out``.

    A batch with annotations is read by detector training as fully annotated: its slides' cells
    not listed are background. Exporting the reviews of a batch that had none makes it so.
    """
    ref = load_batch(store, center, batch)
    corrected = _corrected_cells(store, center, batch)
    if corrected.num_rows == 0:
        raise LabelsError(f"{center}/{batch}: no corrected cells in its current reviews")
    known = {s.slide_id for s in ref.manifest.slides}
    unknown = sorted(set(corrected["slide_id"].to_pylist()) - known)
    if unknown:
        raise LabelsError(f"{center}/{batch}: reviewed slide {unknown[0]!r} is not in the batch")
    existing = _annotations(store, ref)
    merged, superseded = merge_reviewed_cells(
        LABEL_SCHEMA.empty_table() if existing is None else existing, corrected
    )
    if merged.num_rows == 0 and existing is None:
        raise LabelsError(
            f"{center}/{batch}: every corrected cell is {NOT_A_CELL}, nothing to label"
        )
    if out is None:
        target = put_cell_labels(store, ref, merged)
    else:
        pq.write_table(merged, Path(out).expanduser())
        target = str(out)
    return LabelsExport(
        target=target,
        rows=merged.num_rows,
        reviewed=_abnormal(corrected).num_rows,
        superseded=superseded,
    )
