"""Incoming batches become visible only when committed, and are never overwritten."""

import hashlib

import pytest

from smartccs import layout
from smartccs.batches import UploadLease, commit_batch, list_batches, load_batch
from smartccs.errors import AlreadyCommittedError, ManifestError, StoreError
from smartccs.manifest import Manifest, SlideEntry
from smartccs.store import Store


def put_batch(store: Store, center="c1", batch="b1", content=b"slide-bytes") -> Manifest:
    prefix = layout.incoming(center, batch)
    store.write_bytes(f"{prefix}/slides/s1.svs", content)
    return Manifest(
        center=center,
        batch=batch,
        slides=[
            SlideEntry(
                slide_id="s1",
                path="slides/s1.svs",
                sha256=hashlib.sha256(content).hexdigest(),
                bytes=len(content),
            )
        ],
    )


def test_uncommitted_batch_is_invisible_to_readers(any_store: Store):
    put_batch(any_store)
    assert list_batches(any_store) == []
    with pytest.raises(StoreError, match="not a committed batch"):
        load_batch(any_store, "c1", "b1")


def test_committed_batch_is_listed_and_loads_its_manifest(any_store: Store):
    m = put_batch(any_store)
    commit_batch(any_store, m, verify_checksums=True)
    assert list_batches(any_store) == [("c1", "b1")]
    assert load_batch(any_store, "c1", "b1").manifest == m


def test_committed_batch_is_never_overwritten(any_store: Store):
    m = put_batch(any_store)
    commit_batch(any_store, m)
    with pytest.raises(AlreadyCommittedError, match="already committed"):
        commit_batch(any_store, m)


def test_manifest_rewritten_after_commit_is_detected(any_store: Store):
    m = put_batch(any_store)
    commit_batch(any_store, m)
    any_store.write_bytes(f"{layout.incoming('c1', 'b1')}/manifest.json", m.dumps() + b" ")
    with pytest.raises(ManifestError, match="changed after the batch was committed"):
        load_batch(any_store, "c1", "b1")


def test_commit_refuses_objects_that_do_not_match_the_manifest(any_store: Store):
    m = put_batch(any_store)
    any_store.write_bytes(f"{layout.incoming('c1', 'b1')}/slides/s1.svs", b"tampered!!!")
    with pytest.raises(ManifestError, match="sha256 in the store differs"):
        commit_batch(any_store, m, verify_checksums=True)
    any_store.delete(layout.incoming("c1", "b1"), "slides")
    with pytest.raises(ManifestError, match="slides/s1.svs: missing"):
        commit_batch(any_store, m)
    assert list_batches(any_store) == []


def test_second_concurrent_upload_of_a_batch_is_refused(any_store: Store):
    with (
        UploadLease(any_store, "c1", "b1"),
        pytest.raises(StoreError, match="another upload of this batch is in progress"),
        UploadLease(any_store, "c1", "b1"),
    ):
        pass
    with UploadLease(any_store, "c1", "b1"):  # released: free again
        pass
