"""The result tables as analysts read them: DuckDB, polars, pandas and pyarrow pointed at a
table's folder (or its glob), locally and on S3, without smartccs."""

from __future__ import annotations

import os

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from result_rows import write

from smartccs import layout
from smartccs.results.schema import TABLES
from smartccs.results.tables import PART_NAME
from smartccs.store import Store


def test_external_readers_see_committed_files_and_partitions_only(local_store: Store):
    write(local_store, "hospital-a", "2026-11-21", run="run-1", score=0.75)
    write(local_store, "hospital-b", "2026-11-22", run="run-2", score=0.25)
    # what a writer killed mid-write leaves behind: its hidden temporaries, never a bare name
    for table in ("slides", "cells"):
        partition = local_store.path(layout.results(table, "hospital-a", "2026-11-21"))
        with open(os.path.join(partition, f".{PART_NAME}.tmp-abc"), "wb") as f:
            f.write(b"PAR1 half a file")
        marker = local_store.path(layout.result_commit(table, "hospital-a", "2026-11-21"))
        with open(os.path.join(marker, f".{layout.COMMIT_MARKER}.tmp-abc"), "wb") as f:
            f.write(b'{"half":')
    root = local_store.root

    def hive(table: str, *options: str) -> str:
        glob = f"{root}/results/{table}/*/*/*.parquet"
        opts = ", ".join(["hive_partitioning=true", "hive_types_autocast=false", *options])
        return f"read_parquet('{glob}', {opts})"

    con = duckdb.connect()
    slides, cells = hive("slides"), hive("cells")
    files = con.sql(f"SELECT DISTINCT filename FROM {hive('slides', 'filename=true')}")
    assert sorted(os.path.basename(f) for (f,) in files.fetchall()) == [PART_NAME, PART_NAME]
    positives = con.sql(
        f"""SELECT center, count(*) AS slides, count(*) FILTER (positive) AS positives
            FROM {slides} WHERE status IN ('screened', 'inadequate')
            GROUP BY center ORDER BY center"""
    ).fetchall()
    assert positives == [("hospital-a", 1, 1), ("hospital-b", 1, 0)]
    top = con.sql(
        f"""SELECT cell_class, rank, score, x0, y0, x1, y1 FROM {cells}
            WHERE center = 'hospital-a' AND batch = '2026-11-21' AND slide_id = 's1'
            ORDER BY score DESC LIMIT 2"""
    ).fetchall()
    assert [(c, r) for c, r, *_ in top] == [("ASC-US", 0), ("ASC-US", 1)]
    assert con.sql(f"SELECT DISTINCT typeof(batch) FROM {slides}").fetchall() == [("VARCHAR",)]

    df = pd.read_parquet(f"{root}/results/slides", dtype_backend="pyarrow")
    assert len(df) == 4
    per_center = (
        df[df.status.isin(["screened", "inadequate"])]
        .groupby("center", observed=True)
        .agg(scored=("slide_id", "size"), positive=("positive", "sum"))
    )
    assert per_center.to_dict("index") == {
        "hospital-a": {"scored": 1, "positive": 1},
        "hospital-b": {"scored": 1, "positive": 0},
    }

    dataset = ds.dataset(f"{root}/results/cells", format="parquet", partitioning="hive")
    assert sorted(os.path.basename(f) for f in dataset.files) == [PART_NAME, PART_NAME]
    one = dataset.to_table(filter=ds.field("center") == "hospital-b")
    assert one.num_rows == 3 and set(one["run_id"].to_pylist()) == {"run-2"}


@pytest.mark.parametrize(
    "batches", [("2026-11-21", "2026-11-22"), ("20261121", "20261122")], ids=["dates", "digits"]
)
def test_analysts_read_a_table_folder_as_it_is_with_duckdb_polars_pandas_and_pyarrow(
    local_store: Store, batches: tuple[str, str]
):
    """Each tool pointed at a table's folder as docs/results.md shows (issue 27: polars refused
    a folder holding the commit marker beside part-0.parquet). The partition columns come back
    as strings, even for batch ids that look like dates or numbers."""
    first, second = batches
    write(local_store, "hospital-a", first, run="run-1", score=0.75)
    write(local_store, "hospital-b", second, run="run-2", score=0.25)
    folder = {t: f"{local_store.root}/results/{t}" for t in TABLES}
    partitions = {("hospital-a", first), ("hospital-b", second)}

    # polars, as the issue called it, then as the docs do (partition columns as strings)
    assert pl.scan_parquet(folder["slides"], hive_partitioning=True).collect().height == 4
    assert pl.read_parquet(folder["cells"]).height == 6
    strings = {"center": pl.String, "batch": pl.String}
    for table, rows in (("slides", 4), ("cells", 6)):
        got = pl.scan_parquet(folder[table], hive_schema=strings, hidden_file_prefix=".").collect()
        assert got.height == rows and got.schema["center"] == got.schema["batch"] == pl.String
        assert set(got.select("center", "batch").unique().iter_rows()) == partitions
    positives = (
        pl.scan_parquet(folder["slides"], hive_schema=strings, hidden_file_prefix=".")
        .filter(pl.col("status").is_in(["screened", "inadequate"]))
        .group_by("center")
        .agg(pl.len().alias("scored"), pl.col("positive").sum())
        .sort("center")
        .collect()
    )
    assert positives.rows() == [("hospital-a", 1, 1), ("hospital-b", 1, 0)]

    # DuckDB
    con = duckdb.connect()
    for table, rows in (("slides", 4), ("cells", 6)):
        source = (
            f"read_parquet('{folder[table]}/*/*/*.parquet', hive_partitioning = true, "
            "hive_types_autocast = false)"
        )
        found = con.sql(
            f"SELECT center, batch, typeof(center) || '/' || typeof(batch) FROM {source}"
        ).fetchall()
        assert len(found) == rows and {(c, b) for c, b, _ in found} == partitions
        assert {types for *_, types in found} == {"VARCHAR/VARCHAR"}

    # pandas and pyarrow, with the partitioning the docs give
    hive = ds.partitioning(
        pa.schema([("center", pa.string()), ("batch", pa.string())]), flavor="hive"
    )
    for table, rows in (("slides", 4), ("cells", 6)):
        df = pd.read_parquet(folder[table], dtype_backend="pyarrow", partitioning=hive)
        assert len(df) == rows
        assert df["center"].dtype == df["batch"].dtype == pd.ArrowDtype(pa.string())
        assert set(zip(df["center"], df["batch"], strict=True)) == partitions
        got = ds.dataset(folder[table], format="parquet", partitioning=hive).to_table()
        assert got.num_rows == rows
        assert got.schema.field("center").type == got.schema.field("batch").type == pa.string()
        assert set(zip(*got.select(["center", "batch"]).to_pydict().values(), strict=True)) == (
            partitions
        )


def test_s3_tables_are_readable_by_pyarrow_pandas_and_duckdb(s3_store: Store):
    import pyarrow.fs as pafs

    write(s3_store, "hospital-a", "b1", run="run-1")
    write(s3_store, "hospital-b", "b1", run="run-1")
    o = s3_store.config.s3
    bucket_prefix = s3_store.path("results")  # "<bucket>/store/results"

    s3 = pafs.S3FileSystem(
        endpoint_override=o.endpoint_url.removeprefix("http://"),
        scheme="http",
        access_key=o.access_key_id,
        secret_key=o.secret_access_key.get_secret_value(),
        region=o.region,
    )
    dataset = ds.dataset(
        f"{bucket_prefix}/slides", filesystem=s3, format="parquet", partitioning="hive"
    )
    assert [f.rsplit("/", 1)[-1] for f in dataset.files] == [PART_NAME, PART_NAME]
    assert dataset.to_table().num_rows == 4

    df = pd.read_parquet(
        f"s3://{bucket_prefix}/cells",
        storage_options={
            "key": o.access_key_id,
            "secret": o.secret_access_key.get_secret_value(),
            "client_kwargs": {"endpoint_url": o.endpoint_url, "region_name": o.region},
        },
    )
    assert len(df) == 6 and set(df["center"]) == {"hospital-a", "hospital-b"}

    con = duckdb.connect()
    con.register_filesystem(s3_store.fs)  # httpfs is not installed here; fsspec serves s3://
    rows = con.sql(
        f"""SELECT center, count(*) FROM read_parquet('s3://{bucket_prefix}/slides/*/*/*.parquet',
            hive_partitioning=true, hive_types_autocast=false) GROUP BY ALL ORDER BY 1"""
    ).fetchall()
    assert rows == [("hospital-a", 2), ("hospital-b", 2)]
