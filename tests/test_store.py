"""The store: one URI, two filesystems, atomic writes, create-if-absent commit markers."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from smartccs.errors import StoreError
from smartccs.store import Store, StoreConfig


def test_write_then_read_round_trips_on_local_and_s3(any_store: Store):
    any_store.write_bytes("runs/r1/a.json", b"{}")
    assert any_store.read_bytes("runs/r1/a.json") == b"{}"
    assert any_store.exists("runs/r1/a.json")
    assert any_store.list("runs") == ["runs/r1/a.json"]


def test_overwrite_replaces_whole_object_and_leaves_no_temp_files(any_store: Store):
    any_store.write_bytes("x/obj", b"old")
    any_store.write_bytes("x/obj", b"new content")
    assert any_store.read_bytes("x/obj") == b"new content"
    assert any_store.list("x") == ["x/obj"]


def test_put_if_absent_lets_exactly_one_writer_win(any_store: Store):
    assert any_store.put_if_absent("b/_COMMITTED", b"first") is True
    assert any_store.put_if_absent("b/_COMMITTED", b"second") is False
    assert any_store.read_bytes("b/_COMMITTED") == b"first"


def test_missing_object_is_a_store_error_naming_the_uri(any_store: Store):
    with pytest.raises(StoreError, match="nope/never.json does not exist"):
        any_store.read_bytes("nope/never.json")


def test_arrow_filesystem_reads_what_fsspec_wrote(any_store: Store):
    table = pa.table({"a": [1, 2, 3]})
    with any_store.fs.open(any_store.path("t/part-0.parquet"), "wb") as f:
        pq.write_table(table, f)
    assert pq.read_table(any_store.path("t"), filesystem=any_store.arrow_fs).equals(table)


def test_key_of_inverts_uri(any_store: Store):
    assert any_store.key_of(any_store.uri("incoming/c/b/s.svs")) == "incoming/c/b/s.svs"
    with pytest.raises(StoreError, match="not inside store"):
        any_store.key_of("s3://other-bucket/x" if any_store.protocol == "s3" else "/elsewhere/x")


def test_list_dirs_names_immediate_subfolders(any_store: Store):
    any_store.write_bytes("incoming/c1/b1/x", b"1")
    any_store.write_bytes("incoming/c2/b9/x", b"1")
    assert any_store.list_dirs("incoming") == ["c1", "c2"]
    assert any_store.list_dirs("nothing-here") == []


def test_store_survives_pickling_for_ray_workers(any_store: Store):
    import pickle

    any_store.write_bytes("p", b"1")
    clone = pickle.loads(pickle.dumps(any_store))
    assert clone.read_bytes("p") == b"1"


def test_s3_settings_are_resolved_from_aws_variables_on_the_driver(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AK")
    store = Store(StoreConfig(uri="s3://bucket/prefix"))
    assert store.config.s3.endpoint_url == "http://127.0.0.1:1"
    assert store.config.s3.access_key_id == "AK"
    assert store.path("a/b") == "bucket/prefix/a/b"
    assert store.uri("a") == "s3://bucket/prefix/a"


@pytest.mark.parametrize("uri", ["gs://bucket/x", "s3://", "ftp://host/x"])
def test_unsupported_or_incomplete_uris_are_refused(uri: str):
    with pytest.raises(StoreError):
        Store(StoreConfig(uri=uri))


def test_local_default_resolves_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CCS_STORE", raising=False)
    store = Store()
    assert store.root == str(tmp_path / "ccs-data")
    assert store.uri("x") == f"file://{tmp_path}/ccs-data/x"
