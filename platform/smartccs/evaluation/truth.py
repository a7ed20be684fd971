"""Slide-level ground truth for an evaluation: one grade per (center, batch, slide_id).

Three sources, one table (:data:`TRUTH_SCHEMA`): the ground-truth grades that committed batch
manifests carry (``SlideEntry.grade``), the store's cytologists' sign-offs (each slide's current
review, ``smartccs.results.reviews``), or a CSV/Parquet file a pathology team hands over with
columns ``center, batch, slide_id, grade``. A file is checked row by row, and the first bad row
is one :class:`TruthError` naming the file, the row (1-based, the header not counted) and the
field.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from smartccs.batches import load_batch
from smartccs.errors import CCSError, InvalidIdError
from smartccs.ids import validate_id
from smartccs.results.reviews import current_reviews
from smartccs.results.schema import UNSATISFACTORY
from smartccs.store import Store
from smartccs.taxonomy import GRADES

log = logging.getLogger(__name__)

REVIEWS_SOURCE = "reviews"
"""The ``labels`` value that makes the store's reviews the truth (:func:`review_truth`)."""
TRUTH_COLUMNS = ("center", "batch", "slide_id", "grade")
TRUTH_SCHEMA = pa.schema([pa.field(c, pa.string(), nullable=False) for c in TRUTH_COLUMNS])


class TruthError(CCSError):
    """Ground truth that cannot be used: a missing column, a bad row, a duplicate slide."""


def _table(rows: list[tuple[str, str, str, str]]) -> pa.Table:
    cols = list(zip(*rows, strict=True)) if rows else [[] for _ in TRUTH_COLUMNS]
    return pa.Table.from_arrays([pa.array(c, pa.string()) for c in cols], schema=TRUTH_SCHEMA)


def slide_truth(store: Store, partitions: Iterable[tuple[str, str]]) -> pa.Table:
    """Ground-truth grades of the committed batches ``partitions`` ((center, batch) pairs).

    Slides whose manifest entry has no grade are left out; how many is logged (a warning), and
    the evaluation counts them among the results' slides without truth.
    """
    rows: list[tuple[str, str, str, str]] = []
    for center, batch in sorted(set(partitions)):
        ref = load_batch(store, center, batch)
        ungraded = 0
        for s in ref.manifest.slides:
            if s.grade is None:
                ungraded += 1
            else:
                rows.append((center, batch, s.slide_id, s.grade))
        if ungraded:
            log.warning(
                "%s/%s: %d of %d slides have no ground-truth grade in the manifest; "
                "they are left out of the evaluation",
                center,
                batch,
                ungraded,
                len(ref.manifest.slides),
            )
    return _table(rows)


def review_truth(store: Store, partitions: Iterable[tuple[str, str]]) -> pa.Table:
    """Each slide's current review category, as its grade, for the batches ``partitions``.

    A slide signed out unsatisfactory has no grade: it is left out (logged), like a slide
    without one in its manifest; so is a slide nobody reviewed.
    """
    wanted = set(partitions)
    current = current_reviews(store, centers={c for c, _ in wanted}, batches={b for _, b in wanted})
    rows = []
    unsatisfactory = 0
    columns = (current[c].to_pylist() for c in ("center", "batch", "slide_id", "category"))
    for center, batch, slide_id, category in zip(*columns, strict=True):
        if (center, batch) not in wanted:
            continue
        if category == UNSATISFACTORY:
            unsatisfactory += 1
        else:
            rows.append((center, batch, slide_id, category))
    if unsatisfactory:
        log.warning(
            "%d reviewed slide(s) signed out %s are left out of the evaluation",
            unsatisfactory,
            UNSATISFACTORY,
        )
    return _table(rows)


def _read(path: str, data: bytes | None) -> tuple[pa.Table, bool]:
    """The file as a table of strings, and whether it is a CSV (else Parquet)."""
    src = io.BytesIO(data) if data is not None else path
    lower = path.lower()
    try:
        if lower.endswith((".csv", ".csv.gz")):
            opts = pacsv.ConvertOptions(
                column_types={c: pa.string() for c in TRUTH_COLUMNS},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            )
            return pacsv.read_csv(src, convert_options=opts), True
        if lower.endswith((".parquet", ".pq")):
            return pq.read_table(src), False
    except FileNotFoundError:
        raise TruthError(f"{path}: file not found") from None
    except (pa.ArrowException, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TruthError(f"{path}: cannot read the ground-truth file: {first}") from None
    raise TruthError(f"{path}: ground truth must be a .csv or .parquet file")


def truth_from_file(path: str | Path, *, data: bytes | None = None) -> pa.Table:
    """Ground truth from a CSV or Parquet file with columns ``center, batch, slide_id, grade``.

    Extra columns are ignored. Every value must be present, ids must be valid ids and ``grade``
    one of :data:`smartccs.taxonomy.GRADES` (exact spelling); a (center, batch, slide_id)
    appearing twice is an error too, since two grades for one slide cannot both be true.
    ``data`` gives the file's bytes when it does not live on the local disk (an object in S3);
    ``path`` then only names it and tells its format.
    """
    name = str(path)
    table, is_csv = _read(name, data)
    missing = [c for c in TRUTH_COLUMNS if c not in table.column_names]
    if missing:
        raise TruthError(
            f"{name}: missing column {missing[0]!r} (expected {', '.join(TRUTH_COLUMNS)})"
        )
    columns = {}
    for c in TRUTH_COLUMNS:
        col = table[c]
        if col.type != pa.string():
            try:
                col = col.cast(pa.string())
            except pa.ArrowException:
                raise TruthError(
                    f"{name}: column {c!r} has type {col.type}, expected text"
                ) from None
        columns[c] = col.to_pylist()

    def where(i: int) -> str:
        return f"{name}: row {i + 1}" + (f" (line {i + 2})" if is_csv else "")

    rows: list[tuple[str, str, str, str]] = []
    seen: dict[tuple[str, str, str], int] = {}
    for i in range(table.num_rows):
        values = []
        for c in TRUTH_COLUMNS:
            v = columns[c][i]
            v = v.strip() if isinstance(v, str) else v
            if not v:
                raise TruthError(f"{where(i)}: {c}: missing value")
            if c == "grade":
                if v not in GRADES:
                    raise TruthError(f"{where(i)}: grade: {v!r} is not one of {', '.join(GRADES)}")
            else:
                try:
                    validate_id(v, c)
                except InvalidIdError as exc:
                    raise TruthError(f"{where(i)}: {c}: {exc}") from None
            values.append(v)
        key = (values[0], values[1], values[2])
        if key in seen:
            raise TruthError(
                f"{where(i)}: slide_id: {'/'.join(key)} already has a grade at row {seen[key] + 1}"
            )
        seen[key] = i
        rows.append((values[0], values[1], values[2], values[3]))
    return _table(rows)
