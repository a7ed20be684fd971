"""The result tables: atomic per-batch writes that replace, reads of committed files only."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from result_rows import AT, cell_rows, slide_rows, write

from smartccs import layout
from smartccs.results.schema import SCHEMA_VERSION, SLIDES, TABLES
from smartccs.results.tables import (
    PART_NAME,
    ResultCommit,
    ResultsError,
    delete_batch_results,
    list_partitions,
    move_legacy_markers,
    read_commit,
    read_table,
    write_batch_results,
)
from smartccs.store import Store, StoreConfig


def objects(store: Store) -> list[str]:
    return store.list("results")


def test_round_trip_keeps_the_exact_schema_and_adds_partition_columns(any_store: Store):
    commit = write(any_store)
    slides = read_table(any_store, "slides")
    cells = read_table(any_store, "cells")

    assert slides.column_names == ["center", "batch", *SLIDES.names]
    assert slides.schema.field("center").type == pa.string()
    assert slides.drop_columns(["center", "batch"]).equals(slide_rows("run-1"))
    assert cells.drop_columns(["center", "batch"]).equals(cell_rows("run-1"))
    assert set(slides["center"].to_pylist()) == {"hospital-a"}
    assert set(cells["batch"].to_pylist()) == {"b1"}
    failed = slides.filter(pa.compute.equal(slides["status"], "failed")).to_pylist()[0]
    assert failed["score"] is None and failed["error"] == "no mpp in the file or manifest"
    assert read_commit(any_store, "hospital-a", "b1") == commit
    assert objects(any_store) == [
        *(
            f"results/_commits/{t}/center=hospital-a/batch=b1/_COMMITTED"
            for t in ("cells", "slides")
        ),
        *(f"results/{t}/center=hospital-a/batch=b1/{PART_NAME}" for t in ("cells", "slides")),
    ]


def test_each_partition_holds_one_file_pinned_by_the_same_commit_record(local_store: Store):
    commit = write(local_store)
    assert commit.committed_at.tzinfo == UTC
    assert commit.schema_version == SCHEMA_VERSION
    assert commit.tables["slides"].rows == 2 and commit.tables["cells"].rows == 3
    for table in ("slides", "cells"):
        prefix = layout.results(table, "hospital-a", "b1")
        marker = layout.result_commit(table, "hospital-a", "b1")
        record = json.loads(local_store.read_bytes(marker, layout.COMMIT_MARKER))
        assert ResultCommit.model_validate(record) == commit
        assert local_store.list(prefix) == [f"{prefix}/{PART_NAME}"]  # nothing but Parquet
        data = local_store.read_bytes(prefix, PART_NAME)
        assert len(data) == commit.tables[table].bytes
        meta = pq.read_metadata(pa.BufferReader(data))
        assert meta.row_group(0).column(0).compression == "ZSTD"
        assert meta.metadata[b"smartccs.schema_version"] == SCHEMA_VERSION.encode()


def test_rerunning_a_batch_replaces_its_rows_instead_of_duplicating(any_store: Store):
    write(any_store, run="run-1", score=0.75)
    second = write(any_store, run="run-2", score=0.25)

    slides = read_table(any_store, "slides")
    cells = read_table(any_store, "cells")
    assert slides.num_rows == 2 and cells.num_rows == 3
    assert set(slides["run_id"].to_pylist()) == set(cells["run_id"].to_pylist()) == {"run-2"}
    assert slides.filter(pa.compute.equal(slides["slide_id"], "s1"))["score"][0].as_py() == 0.25
    assert read_commit(any_store, "hospital-a", "b1") == second
    assert len(objects(any_store)) == 4  # still one file + one marker per table


def test_batches_and_centers_coexist_and_reads_filter_by_them(local_store: Store):
    for center, batch in [("hospital-a", "b1"), ("hospital-a", "b2"), ("hospital-b", "b1")]:
        write(local_store, center, batch, run=f"run-{center}-{batch}")

    expected = [("hospital-a", "b1"), ("hospital-a", "b2"), ("hospital-b", "b1")]
    assert list_partitions(local_store) == list_partitions(local_store, "cells") == expected
    assert read_table(local_store, "slides").num_rows == 6

    def pairs(t: pa.Table) -> set[tuple[str, str]]:
        return set(zip(t["center"].to_pylist(), t["batch"].to_pylist(), strict=True))

    assert pairs(read_table(local_store, "cells", centers=["hospital-a"])) == set(expected[:2])
    assert pairs(read_table(local_store, "slides", batches=["b1"])) == {expected[0], expected[2]}
    assert pairs(read_table(local_store, "slides", centers="hospital-b")) == {expected[2]}
    empty = read_table(local_store, "cells", centers=["nowhere"])
    assert empty.num_rows == 0
    assert empty.schema == read_table(local_store, "cells").schema


def test_nothing_committed_reads_as_an_empty_table_and_unknown_tables_are_refused(
    local_store: Store,
):
    assert list_partitions(local_store) == []
    assert read_commit(local_store, "hospital-a", "b1") is None
    empty = read_table(local_store, "slides")
    assert empty.num_rows == 0 and empty.column_names == ["center", "batch", *SLIDES.names]
    with pytest.raises(ResultsError, match="unknown result table 'patients'"):
        read_table(local_store, "patients")


def test_a_partition_without_its_marker_is_not_listed(local_store: Store):
    write(local_store)
    local_store.delete(layout.result_commit("slides", "hospital-a", "b1"), layout.COMMIT_MARKER)
    assert list_partitions(local_store) == []
    assert read_table(local_store, "slides").num_rows == 0
    assert read_commit(local_store, "hospital-a", "b1") is None


def test_local_writes_stage_under_hidden_names(local_store: Store, monkeypatch):
    replaced: list[tuple[str, str]] = []
    real_replace = os.replace

    def spy(src, dst):
        replaced.append((os.path.basename(src), os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    write(local_store)
    for src, dst in replaced:
        assert src.startswith((".", "_")), src  # skipped by every Parquet reader
        assert dst in (PART_NAME, layout.COMMIT_MARKER)


def test_markers_of_a_store_written_before_the_move_are_read_and_moved(local_store: Store):
    """Stores written before the commit markers moved to results/_commits keep them beside
    part-0.parquet: the library still reads them, a re-run, a retraction and
    move_legacy_markers each take them out of the table folders."""
    commits = {b: write(local_store, "hospital-a", b, run=f"run-{b}") for b in ("b1", "b2", "b3")}
    for batch in commits:  # as a store written before the move holds them
        for t in TABLES:
            marker = layout.result_commit(t, "hospital-a", batch)
            data = local_store.read_bytes(marker, layout.COMMIT_MARKER)
            local_store.delete(marker)
            local_store.write_bytes(
                f"{layout.results(t, 'hospital-a', batch)}/{layout.COMMIT_MARKER}", data
            )
    listed = [("hospital-a", b) for b in commits]
    assert list_partitions(local_store) == list_partitions(local_store, "cells") == listed
    assert read_commit(local_store, "hospital-a", "b1") == commits["b1"]
    assert read_table(local_store, "cells").num_rows == 9

    def table_files(batch: str) -> list[str]:
        return sorted(k.rsplit("/", 1)[-1] for t in TABLES for k in
                      local_store.list(layout.results(t, "hospital-a", batch)))  # fmt: skip

    again = write(local_store, "hospital-a", "b1", run="run-again")  # a re-run
    assert table_files("b1") == [PART_NAME, PART_NAME]
    assert read_commit(local_store, "hospital-a", "b1") == again
    assert delete_batch_results(local_store, "hospital-a", "b2") == commits["b2"]
    assert not any("batch=b2" in k for k in objects(local_store))
    assert read_commit(local_store, "hospital-a", "b2") is None

    moved = move_legacy_markers(local_store)
    assert sorted(moved) == [
        f"{layout.results(t, 'hospital-a', 'b3')}/{layout.COMMIT_MARKER}" for t in TABLES[::-1]
    ]
    assert table_files("b3") == [PART_NAME, PART_NAME]
    assert read_commit(local_store, "hospital-a", "b3") == commits["b3"]
    assert list_partitions(local_store) == [("hospital-a", "b1"), ("hospital-a", "b3")]
    assert move_legacy_markers(local_store) == []
    assert pl.read_parquet(f"{local_store.root}/results/slides").height == 4


def test_a_file_replaced_after_its_commit_is_refused_naming_it(any_store: Store):
    write(any_store, run="run-1")
    other = pa.BufferOutputStream()
    pq.write_table(slide_rows("run-2", score=0.1), other, compression="zstd")
    key = f"{layout.results('slides', 'hospital-a', 'b1')}/{PART_NAME}"
    any_store.write_bytes(key, other.getvalue().to_pybytes())

    with pytest.raises(ResultsError, match=f"{key}.* not the file run run-1 committed"):
        read_table(any_store, "slides")
    assert read_table(any_store, "cells").num_rows == 3  # its own file is as committed


def test_deleting_a_batch_retracts_both_tables_and_nothing_else(local_store: Store):
    first = write(local_store, "hospital-a", "b1")
    write(local_store, "hospital-a", "b2")
    assert delete_batch_results(local_store, "hospital-a", "b1") == first
    assert list_partitions(local_store) == list_partitions(local_store, "cells")
    assert list_partitions(local_store) == [("hospital-a", "b2")]
    assert not any("batch=b1" in k for k in objects(local_store))
    assert read_commit(local_store, "hospital-a", "b1") is None
    assert delete_batch_results(local_store, "hospital-a", "b1") is None


def _with(table: pa.Table, name: str, values: list, type_: pa.DataType | None = None) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, pa.array(values, type_))


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (
            lambda s, c: (_with(s, "score", ["0.75", None]), c),
            r"slides\.score: type string where the schema has float",
        ),
        (
            lambda s, c: (s, _with(c, "rank", [0.0, 1.5, 2.0])),
            r"cells\.rank: double cannot be stored as int16 without loss",
        ),
        (
            lambda s, c: (s, _with(c, "width_um", [1e300, 1.0, 1.0])),
            r"cells\.width_um: values out of range for float",
        ),
        (
            lambda s, c: (_with(s, "screened_at", [datetime(2026, 1, 1)] * 2), c),
            r"slides\.screened_at: timestamp without a time zone",
        ),
        (
            lambda s, c: (_with(s, "slide_id", ["s1", "s1"]), c),
            r"slide_id 's1' appears 2 times",
        ),
        (
            lambda s, c: (s, _with(c, "slide_id", ["s1", "s9", "s1"])),
            r"cells: slide_id \['s9'\] not in the slides table",
        ),
        (
            lambda s, c: (s.add_column(0, "center", pa.array(["x", "x"])), c),
            r"slides: has partition column\(s\) \['center'\]",
        ),
        (
            lambda s, c: (s, c.drop_columns(["height_um"])),
            r"cells: missing columns \['height_um'\]",
        ),
        (
            lambda s, c: (s.select([1, 0, *range(2, s.num_columns)]), c),
            r"slides: column 0 is 'run_id' where the schema has 'slide_id'",
        ),
        (
            lambda s, c: (s, _with(c, "run_id", ["run-1", "run-0", "run-1"])),
            r"cells\.run_id: \['run-0'\] in rows written by run 'run-1'",
        ),
        (
            lambda s, c: (_with(s, "status", ["screened", "lost"]), c),
            r"slide 's2' has status 'lost'",
        ),
        (
            lambda s, c: (_with(s, "run_id", ["run-1", None]), c),
            r"slides\.run_id: 1 null value",
        ),
    ],
    ids=[
        "wrong-type",
        "lossy-cast",
        "float-overflow",
        "naive-timestamp",
        "duplicate-slide",
        "cell-of-unknown-slide",
        "partition-column",
        "missing-column",
        "column-order",
        "other-run",
        "unknown-status",
        "null-in-required",
    ],
)
def test_bad_tables_are_refused_before_anything_is_written(local_store: Store, breakage, message):
    committed = write(local_store, run="run-0")
    before = {k: local_store.read_bytes(k) for k in objects(local_store)}
    slides, cells = breakage(slide_rows("run-1"), cell_rows("run-1"))
    with pytest.raises(ResultsError, match=message):
        write_batch_results(local_store, "hospital-a", "b1", "run-1", slides, cells)
    assert {k: local_store.read_bytes(k) for k in objects(local_store)} == before
    assert read_commit(local_store, "hospital-a", "b1") == committed


def test_lossless_conversions_are_accepted_and_stored_in_schema_types(local_store: Store):
    slides = slide_rows("run-1")
    slides = _with(slides, "score", [0.75, None], pa.float64())
    slides = _with(slides, "n_tiles", [40, None], pa.int64())
    slides = _with(slides, "slide_id", ["s1", "s2"], pa.large_string())
    slides = _with(slides, "screened_at", [AT, AT], pa.timestamp("ns", tz="Europe/Paris"))
    cells = _with(cell_rows("run-1"), "rank", [0.0, 1.0, 2.0])
    cells = _with(cells, "height_um", [None, None, None], pa.null())
    write_batch_results(local_store, "hospital-a", "b1", "run-1", slides, cells)

    back = read_table(local_store, "slides").drop_columns(["center", "batch"])
    assert back.schema == SLIDES
    assert back.equals(slide_rows("run-1"))
    assert read_table(local_store, "cells")["rank"].to_pylist() == [0, 1, 2]


def test_files_of_an_older_minor_version_read_with_nulls_for_new_columns(local_store: Store):
    commit = write(local_store)
    prefix = layout.results("slides", "hospital-a", "b1")
    old = pq.read_table(pa.BufferReader(local_store.read_bytes(prefix, PART_NAME)))
    old = old.drop_columns(["encoder"])  # as if "encoder" had come with a later minor version
    sink = pa.BufferOutputStream()
    pq.write_table(old, sink)
    data = sink.getvalue().to_pybytes()
    tables = dict(commit.tables)
    tables["slides"] = tables["slides"].model_copy(
        update={"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    )
    local_store.write_bytes(f"{prefix}/{PART_NAME}", data)
    marker = f"{layout.result_commit('slides', 'hospital-a', 'b1')}/{layout.COMMIT_MARKER}"
    local_store.write_bytes(
        marker,
        commit.model_copy(update={"tables": tables}).model_dump_json().encode(),
    )
    slides = read_table(local_store, "slides")
    assert slides.schema.field("encoder").type == pa.string()
    assert slides["encoder"].null_count == 2

    major = commit.model_copy(update={"tables": tables, "schema_version": "2.0"})
    local_store.write_bytes(marker, major.model_dump_json().encode())
    with pytest.raises(
        ResultsError, match=f"holds schema 2.0; this smartccs reads {SCHEMA_VERSION}"
    ):
        read_table(local_store, "slides")


def test_copying_a_batch_keeps_its_commit_and_never_replaces_committed_results(
    local_store: Store, tmp_path
):
    from smartccs.results.copy import copy_batch_results

    dst = Store(StoreConfig(uri=str(tmp_path / "published")))
    commit = write(local_store, batch="b1", run="arm-run")
    write(local_store, batch="b2", run="arm-run")
    write(dst, batch="b2", run="mine", score=0.25)  # dst's own, newer run of b2

    assert copy_batch_results(local_store, dst, "hospital-a", "b1")
    assert read_commit(dst, "hospital-a", "b1") == commit
    for table in TABLES:
        assert read_table(dst, table, batches="b1").equals(
            read_table(local_store, table, batches="b1")
        )
    assert not copy_batch_results(local_store, dst, "hospital-a", "b1")  # once
    assert not copy_batch_results(local_store, dst, "hospital-a", "b2")  # never over a commit
    assert set(read_table(dst, "slides", batches="b2")["run_id"].to_pylist()) == {"mine"}
    with pytest.raises(ResultsError, match="no committed results for hospital-a/b3"):
        copy_batch_results(local_store, dst, "hospital-a", "b3")
