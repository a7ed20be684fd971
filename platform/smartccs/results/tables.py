"""Atomic, replace-not-duplicate writes of the result tables, and committed-only reads.

Each (center, batch) has one partition per table, ``results/<table>/center=<c>/batch=<b>/``,
holding exactly one Parquet file with a fixed name, ``part-0.parquet``. Its ``_COMMITTED``
record (:class:`ResultCommit`), which pins that file's sha256, sits in a mirror tree beside the
tables, ``results/_commits/<table>/center=<c>/batch=<b>/_COMMITTED``: a table folder holds
nothing but Parquet files, so DuckDB, polars, pandas, pyarrow and Spark read it as it is
(polars refuses a folder holding any other file). Stores written before the move keep their
markers inside the partitions: they are read there too, and :func:`move_legacy_markers` moves
them. Because the name is fixed, re-running a batch overwrites the file rather than adding a
second one: rows are replaced, never duplicated. Every file is serialised in memory and written
in one atomic step (one S3 PUT; a local write to a hidden temporary name renamed over the
target), so no reader ever sees part of a file. Names starting with ``_`` or ``.`` are skipped
by pyarrow, pandas and Spark, and DuckDB's ``*/*/*.parquet`` glob does not match a temporary
file.

A write goes: cells file, slides file, cells marker, slides marker (the one readers list).
On a local store it first removes the staging files a writer killed mid-write left in the two
partitions (no reader reads them, but they would stay there for good).

Honest limit: each table's partition file flips atomically, but the two tables flip one after
the other, and the markers after both. A reader that globs the files (DuckDB, pandas, pyarrow)
without looking at the markers may, during a re-run or after a crash between the two files, see
the new run's cells next to the previous run's slides (or, on a first write, cells before their
slides exist). :func:`read_table` checks each file against its marker's sha256, so library
readers never mix runs: a file whose commit has not landed is refused, naming the file, until
the marker lands (or the batch is re-run after a crash). Two concurrent writers of the same batch
are not supported (one screening job per batch); if it happens, the mix is detected the same way.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Annotated

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from smartccs import layout
from smartccs.errors import CCSError, StoreError, describe_validation_error
from smartccs.ids import Id, validate_id
from smartccs.results.schema import (
    PARTITION_COLUMNS,
    SCHEMA_VERSION,
    SCHEMAS,
    SLIDE_STATUSES,
    TABLES,
)
from smartccs.store import Store

log = logging.getLogger(__name__)

PART_NAME = "part-0.parquet"
"""The one data file of a partition; fixed, so a re-run overwrites instead of adding rows."""

COMPRESSION = "zstd"

_WRITE_ORDER = ("cells", "slides")
"""Cells before slides, for files and markers alike: a slides partition that readers can list
always has its cells committed."""

_MARKER_RE = re.compile(  # relative to a table's folder or to its commits folder
    r"center=([A-Za-z0-9][A-Za-z0-9._-]*)/batch=([A-Za-z0-9][A-Za-z0-9._-]*)/"
    + re.escape(layout.COMMIT_MARKER)
)


class ResultsError(CCSError):
    """A result table that does not fit its schema, or a partition that is not as committed."""


class TableFile(BaseModel):
    """One table's file as committed: the marker pins its content."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rows: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


class ResultCommit(BaseModel):
    """Content of a partition's ``_COMMITTED`` record; the same record sits in both tables."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: str = Field(pattern=r"^\d+\.\d+$")
    center: Id
    batch: Id
    run_id: Id
    committed_at: Annotated[AwareDatetime, AfterValidator(_utc)]
    tables: dict[str, TableFile]

    @field_validator("tables")
    @classmethod
    def _both_tables(cls, value: dict[str, TableFile]) -> dict[str, TableFile]:
        if set(value) != set(TABLES):
            raise ValueError(f"must name exactly the tables {list(TABLES)}, got {sorted(value)}")
        return value


# --- validation -----------------------------------------------------------------------------
def _family(t: pa.DataType) -> str:
    if pa.types.is_dictionary(t):
        return _family(t.value_type)
    if pa.types.is_null(t):
        return "null"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_timestamp(t):
        return "timestamp"
    return str(t)


_CASTABLE_FROM = {
    "int": {"int", "float"},  # a float is accepted only if integral (Arrow's safe cast checks)
    "float": {"int", "float"},  # an int only if exactly representable (ditto)
    "bool": {"bool"},
    "string": {"string"},
    "timestamp": {"timestamp"},
}
"""Type families that may be cast into a schema type; anything else (a number given as text,
a bool as 0/1) is a producer bug, refused rather than parsed."""


def _cast_column(table: str, field: pa.Field, col: pa.ChunkedArray) -> pa.ChunkedArray:
    if col.type == field.type:
        return col
    where = f"{table}.{field.name}"
    src, dst = _family(col.type), _family(field.type)
    if src != "null" and src not in _CASTABLE_FROM.get(dst, ()):
        raise ResultsError(f"{where}: type {col.type} where the schema has {field.type}")
    value_type = col.type.value_type if pa.types.is_dictionary(col.type) else col.type
    if dst == "timestamp" and value_type.tz is None:
        raise ResultsError(
            f"{where}: timestamp without a time zone ({col.type}) is ambiguous; "
            f"give it time-zone aware ({field.type})"
        )
    try:
        out = pc.cast(col, field.type, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ResultsError(
            f"{where}: {col.type} cannot be stored as {field.type} without loss ({exc})"
        ) from None
    if dst == "float" and src == "float" and _infinities(out) > _infinities(col):
        raise ResultsError(f"{where}: values out of range for {field.type}")
    return out


def _infinities(col: pa.ChunkedArray) -> int:
    if not pa.types.is_floating(col.type):
        return 0
    return pc.sum(pc.is_inf(col)).as_py() or 0


def _conform(name: str, table: pa.Table) -> pa.Table:
    """``table`` with exactly the schema of ``name``, or a ResultsError naming table and column."""
    schema = SCHEMAS[name]
    if not isinstance(table, pa.Table):
        raise ResultsError(f"{name}: expected a pyarrow.Table, got {type(table).__name__}")
    names = table.column_names
    partition = [c for c in PARTITION_COLUMNS if c in names]
    if partition:
        raise ResultsError(
            f"{name}: has partition column(s) {partition}; center and batch live in the "
            "partition path, not in the file: drop them"
        )
    missing = [c for c in schema.names if c not in names]
    extra = [c for c in names if c not in schema.names]
    repeated = sorted({c for c in names if names.count(c) > 1})
    if missing or extra or repeated:
        problems = [
            f"{label} {cols}"
            for label, cols in (
                ("missing columns", missing),
                ("unexpected columns", extra),
                ("repeated columns", repeated),
            )
            if cols
        ]
        raise ResultsError(
            f"{name}: {'; '.join(problems)} (schema {SCHEMA_VERSION}, docs/results.md)"
        )
    if names != schema.names:
        i = next(i for i, (a, b) in enumerate(zip(names, schema.names, strict=True)) if a != b)
        raise ResultsError(
            f"{name}: column {i} is {names[i]!r} where the schema has {schema.names[i]!r}; "
            "give the columns in schema order"
        )
    columns = []
    for field in schema:
        col = _cast_column(name, field, table.column(field.name))
        if not field.nullable and col.null_count:
            raise ResultsError(f"{name}.{field.name}: {col.null_count} null value(s), not allowed")
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=schema)


def _check_rows(slides: pa.Table, cells: pa.Table, run_id: str) -> None:
    """Rows that fit the schema but not the batch: wrong run, repeated or unknown slide."""
    for name, table in (("slides", slides), ("cells", cells)):
        col = table["run_id"]
        others = pc.unique(pc.filter(col, pc.not_equal(col, run_id))).to_pylist()
        if others:
            raise ResultsError(
                f"{name}.run_id: {sorted(others)[:3]} in rows written by run {run_id!r}; "
                "every row must carry the run that writes it"
            )
    counts = pc.value_counts(slides["slide_id"])
    repeated = pc.filter(counts, pc.greater(counts.field("counts"), 1)).to_pylist()
    if repeated:
        first = repeated[0]
        raise ResultsError(
            f"slides: slide_id {first['values']!r} appears {first['counts']} times; "
            "a batch has one row per slide"
        )
    bad = pc.filter(slides, pc.invert(pc.is_in(slides["status"], pa.array(SLIDE_STATUSES))))
    if bad.num_rows:
        row = bad.slice(0, 1).to_pylist()[0]
        raise ResultsError(
            f"slides: slide {row['slide_id']!r} has status {row['status']!r}; "
            f"use one of {list(SLIDE_STATUSES)}"
        )
    known = slides["slide_id"].combine_chunks()
    unknown = pc.unique(pc.filter(cells["slide_id"], pc.invert(pc.is_in(cells["slide_id"], known))))
    if len(unknown):
        raise ResultsError(
            f"cells: slide_id {sorted(unknown.to_pylist())[:3]} not in the slides table; "
            "every cell belongs to a slide of the same batch"
        )


# --- store I/O ------------------------------------------------------------------------------
def _to_parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=COMPRESSION)
    return sink.getvalue().to_pybytes()


def _schema(table: str) -> pa.Schema:
    try:
        return SCHEMAS[table]
    except KeyError:
        raise ResultsError(
            f"unknown result table {table!r}; the tables are {list(TABLES)}"
        ) from None


def _marker_prefixes(table: str, center: str, batch: str) -> tuple[str, str]:
    """Where a partition's commit marker is (the commits tree), and where stores written before
    the move kept it (inside the partition)."""
    return layout.result_commit(table, center, batch), layout.results(table, center, batch)


def _read_marker(store: Store, table: str, center: str, batch: str) -> ResultCommit | None:
    for prefix in _marker_prefixes(table, center, batch):  # the current place wins
        data = store.read_bytes_or_none(prefix, layout.COMMIT_MARKER)
        if data is not None:
            break
    else:
        return None
    try:
        commit = ResultCommit.model_validate_json(data)
    except ValidationError as exc:
        raise ResultsError(
            f"{store.uri(prefix, layout.COMMIT_MARKER)}: {describe_validation_error(exc)}"
        ) from None
    if (commit.center, commit.batch) != (center, batch):
        raise ResultsError(
            f"{store.uri(prefix, layout.COMMIT_MARKER)} commits center={commit.center} "
            f"batch={commit.batch}, not the partition it sits in"
        )
    return commit


def write_batch_results(
    store: Store, center: str, batch: str, run_id: str, slides: pa.Table, cells: pa.Table
) -> ResultCommit:
    """Publish one batch's results from one run, replacing any earlier run's rows.

    Everything is validated before anything is written, so a bad table never disturbs the
    results already committed for the batch.
    """
    validate_id(center, "center")
    validate_id(batch, "batch")
    validate_id(run_id, "run id")
    tables = {"slides": _conform("slides", slides), "cells": _conform("cells", cells)}
    _check_rows(tables["slides"], tables["cells"], run_id)
    payloads = {name: _to_parquet(t) for name, t in tables.items()}
    commit = ResultCommit(
        schema_version=SCHEMA_VERSION,
        center=center,
        batch=batch,
        run_id=run_id,
        committed_at=datetime.now(UTC),
        tables={
            name: TableFile(
                rows=tables[name].num_rows,
                sha256=hashlib.sha256(payloads[name]).hexdigest(),
                bytes=len(payloads[name]),
            )
            for name in TABLES
        },
    )
    for name in _WRITE_ORDER:  # one writer per batch: any staging file here is a dead one's
        for prefix in _marker_prefixes(name, center, batch):
            for key in store.remove_staging(prefix):
                log.warning("removed %s, left by a writer killed mid-write", store.uri(key))
    for name in _WRITE_ORDER:
        store.write_bytes(f"{layout.results(name, center, batch)}/{PART_NAME}", payloads[name])
    record = commit.model_dump_json(indent=2).encode()
    for name in _WRITE_ORDER:
        marker, legacy = _marker_prefixes(name, center, batch)
        store.write_bytes(f"{marker}/{layout.COMMIT_MARKER}", record)
        store.delete(legacy, layout.COMMIT_MARKER)  # a marker from before the move: superseded
    return commit


def read_commit(store: Store, center: str, batch: str) -> ResultCommit | None:
    """The batch's current commit (which run, when, how many rows), or None if it has none."""
    return _read_marker(store, "slides", center, batch)


def _listed_markers(store: Store, base: str) -> list[tuple[str, str, str]]:
    """(center, batch, key) of every commit marker under ``base``; one listing call."""
    store.fs.invalidate_cache(store.path(base))  # another process may have written since
    found = []
    for key in store.list(base):
        m = _MARKER_RE.fullmatch(key[len(base) + 1 :])
        if m:
            found.append((m[1], m[2], key))
    return found


def list_partitions(store: Store, table: str = "slides") -> list[tuple[str, str]]:
    """Sorted (center, batch) pairs whose ``table`` partition is committed: two listing calls,
    the commits tree and (for markers from before the move) the table's folder."""
    _schema(table)
    found = set()
    for base in (f"{layout.RESULT_COMMITS}/{table}", f"results/{table}"):
        found.update((center, batch) for center, batch, _ in _listed_markers(store, base))
    return sorted(found)


def move_legacy_markers(store: Store) -> list[str]:
    """Move the commit markers that stores written before the move keep inside the partitions
    to the commits tree, so polars can read the table folders; the keys moved.

    Safe beside a live writer: a marker is created only where none is (a writer's newer one
    wins) and the old one removed after. Idempotent; readers see the batch throughout.
    """
    moved = []
    for table in TABLES:
        for center, batch, key in _listed_markers(store, f"results/{table}"):
            marker, legacy = _marker_prefixes(table, center, batch)
            data = store.read_bytes_or_none(key)
            if data is None:  # removed since it was listed
                continue
            store.put_if_absent(f"{marker}/{layout.COMMIT_MARKER}", data)
            store.delete(legacy, layout.COMMIT_MARKER)
            log.info("moved %s to %s", store.uri(key), store.uri(marker, layout.COMMIT_MARKER))
            moved.append(key)
    return moved


def _selection(values: Iterable[str] | None) -> set[str] | None:
    if values is None:
        return None
    return {values} if isinstance(values, str) else set(values)


def _output_schema(schema: pa.Schema) -> pa.Schema:
    partition = [pa.field(c, pa.string(), nullable=False) for c in PARTITION_COLUMNS]
    return pa.schema([*partition, *schema], metadata=schema.metadata)


def _read_partition(
    store: Store, table: str, center: str, batch: str, out: pa.Schema
) -> pa.Table | None:
    commit = _read_marker(store, table, center, batch)
    if commit is None:  # retracted since it was listed
        return None
    prefix = layout.results(table, center, batch)
    if commit.schema_version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise ResultsError(
            f"{store.uri(prefix)} holds schema {commit.schema_version}; this smartccs reads "
            f"{SCHEMA_VERSION}: re-run the batch or upgrade smartccs"
        )
    uri = store.uri(prefix, PART_NAME)
    try:
        data = store.read_bytes(prefix, PART_NAME)
    except StoreError:
        raise ResultsError(f"{uri} is missing, though run {commit.run_id} committed it") from None
    if hashlib.sha256(data).hexdigest() != commit.tables[table].sha256:
        raise ResultsError(
            f"{uri} is not the file run {commit.run_id} committed: it was replaced by a run whose "
            "commit has not landed yet (retry shortly; re-run the batch if its writer crashed) "
            "or modified outside smartccs"
        )
    found = pq.read_table(pa.BufferReader(data))
    n = found.num_rows
    columns = [pa.chunked_array([pa.repeat(pa.scalar(v, pa.string()), n)]) for v in (center, batch)]
    for field in _schema(table):
        if field.name in found.column_names:  # an older minor version may lack a column
            columns.append(found[field.name].cast(field.type))
        elif field.nullable:
            columns.append(pa.nulls(n, field.type))
        else:
            raise ResultsError(f"{uri} lacks the non-nullable column {field.name!r}")
    return pa.Table.from_arrays(columns, schema=out)


def read_table(
    store: Store,
    table: str,
    centers: Iterable[str] | None = None,
    batches: Iterable[str] | None = None,
) -> pa.Table:
    """Every committed partition of ``table`` (optionally some centers/batches), as one table.

    ``center`` and ``batch`` come first, taken from the partition path. Each file is checked
    against its commit record, so the rows of a run whose commit has not landed are never
    returned. Nothing committed gives an empty table with the same columns.
    """
    out = _output_schema(_schema(table))
    want_centers, want_batches = _selection(centers), _selection(batches)
    parts = []
    for center, batch in list_partitions(store, table):
        if want_centers is not None and center not in want_centers:
            continue
        if want_batches is not None and batch not in want_batches:
            continue
        part = _read_partition(store, table, center, batch, out)
        if part is not None:
            parts.append(part)
    return pa.concat_tables(parts) if parts else out.empty_table()


def delete_batch_results(store: Store, center: str, batch: str) -> ResultCommit | None:
    """Retract a batch's results (operator action); returns the commit retracted, if any.

    Markers go first, slides before cells (the reverse of a write), so library readers stop
    seeing the batch at once and never find a marker without its file; the files follow. An
    old-place marker goes before the current one, which would otherwise be read in its stead.
    """
    commit = read_commit(store, center, batch)
    for name in TABLES:
        marker, legacy = _marker_prefixes(name, center, batch)
        store.delete(legacy, layout.COMMIT_MARKER)
        store.delete(marker)
    for name in TABLES:
        store.delete(layout.results(name, center, batch))
    return commit
