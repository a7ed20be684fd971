"""SlideCache: S3 slides become verified local files, bounded in size, shared by processes."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from pathlib import Path

import pytest
from slide_factory import write_disc_slide

from smartccs.errors import SlideError
from smartccs.slide.cache import SlideCache
from smartccs.slide.reader import open_slide
from smartccs.store import Store

pytestmark = pytest.mark.s3

KB = 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put(store: Store, key: str, data: bytes) -> tuple[str, int]:
    store.write_bytes(key, data)
    return sha(data), len(data)


def cache_files(cache: SlideCache) -> list[str]:
    return sorted(p.name for p in cache.root.rglob("*") if p.is_file() and p.name != ".evict.lock")


def test_s3_slide_is_downloaded_verified_and_opens(s3_store: Store, tmp_path: Path):
    slide = write_disc_slide(tmp_path / "s.svs", mpp=0.25, size_px=512)
    s3_store.put_file(slide, "incoming/c1/b1/s.svs")
    digest, size = sha(slide.read_bytes()), slide.stat().st_size
    cache = SlideCache(tmp_path / "cache", max_bytes=10 * size)

    local = cache.local_path(s3_store, "incoming/c1/b1/s.svs", digest, size)

    assert local.parent.parent == tmp_path / "cache"
    assert local.read_bytes() == slide.read_bytes()
    with open_slide(local, name="s.svs") as opened:
        assert opened.info.vendor == "aperio"
    assert cache_files(cache) == [local.name]  # no temp file or lock left behind
    # a hit re-reads nothing: the same entry, never rewritten
    inode = local.stat().st_ino
    assert cache.local_path(s3_store, "incoming/c1/b1/s.svs", digest, size) == local
    assert local.stat().st_ino == inode


def test_checksum_mismatch_names_the_key_and_keeps_nothing(s3_store: Store, tmp_path: Path):
    _, size = put(s3_store, "incoming/c1/b1/x.svs", b"tampered" * 1000)
    cache = SlideCache(tmp_path / "cache", max_bytes=10**6)
    with pytest.raises(SlideError) as exc:
        cache.local_path(s3_store, "incoming/c1/b1/x.svs", "a" * 64, size)
    message = str(exc.value)
    assert message.startswith(s3_store.uri("incoming/c1/b1/x.svs") + ": sha256 mismatch")
    assert "\n" not in message
    assert cache_files(cache) == []


def test_size_mismatch_is_refused(s3_store: Store, tmp_path: Path):
    digest, size = put(s3_store, "k.svs", b"x" * 5000)
    cache = SlideCache(tmp_path / "cache", max_bytes=10**6)
    with pytest.raises(SlideError, match="5000 bytes in the store, the manifest says 4000"):
        cache.local_path(s3_store, "k.svs", digest, 4000)
    with pytest.raises(SlideError, match="5000 bytes in the store, the manifest says 6000"):
        SlideCache(tmp_path / "c2", max_bytes=10**6).local_path(s3_store, "k.svs", digest, 6000)
    assert cache.local_path(s3_store, "k.svs", digest, size).stat().st_size == 5000


def test_least_recently_used_slides_are_evicted_to_stay_in_bounds(s3_store: Store, tmp_path: Path):
    objects = {name: put(s3_store, name, os.urandom(40 * KB)) for name in "abc"}
    cache = SlideCache(tmp_path / "cache", max_bytes=100 * KB)  # room for two
    path = {name: cache.local_path(s3_store, name, *objects[name]) for name in "ab"}
    cache.local_path(s3_store, "a", *objects["a"])  # a is used again: b is now the oldest
    path["c"] = cache.local_path(s3_store, "c", *objects["c"])

    assert path["a"].exists() and path["c"].exists()
    assert not path["b"].exists()
    assert cache.total_bytes() <= 100 * KB
    assert [e.path for e in cache.entries()] == [path["a"], path["c"]]


def test_slide_larger_than_the_whole_cache_is_a_clear_error(s3_store: Store, tmp_path: Path):
    digest, size = put(s3_store, "big.svs", os.urandom(64 * KB))
    cache = SlideCache(tmp_path / "cache", max_bytes=32 * KB)
    with pytest.raises(SlideError, match=r"big\.svs: .* GiB does not fit in the slide cache"):
        cache.local_path(s3_store, "big.svs", digest, size)


def test_local_store_slides_are_used_in_place(local_store: Store, tmp_path: Path):
    digest, size = put(local_store, "incoming/c/b/s.svs", b"slide bytes")
    cache = SlideCache(tmp_path / "cache", max_bytes=KB)
    path = cache.local_path(local_store, "incoming/c/b/s.svs", digest, size)
    assert path == Path(local_store.path("incoming/c/b/s.svs"))
    assert not (tmp_path / "cache").exists()  # nothing copied
    with pytest.raises(SlideError, match="11 bytes on disk, the manifest says 12"):
        cache.local_path(local_store, "incoming/c/b/s.svs", digest, 12)
    with pytest.raises(SlideError, match="not found in the store"):
        cache.local_path(local_store, "incoming/c/b/missing.svs", digest, size)


def test_missing_object_is_a_slide_error(s3_store: Store, tmp_path: Path):
    cache = SlideCache(tmp_path / "cache", max_bytes=KB)
    with pytest.raises(SlideError, match=r"missing\.svs: not found in the store"):
        cache.local_path(s3_store, "missing.svs", "b" * 64, None)


def test_object_without_checksum_is_cached_as_it_is(s3_store, tmp_path):
    put(s3_store, "any.svs", b"inspect me")
    cache = SlideCache(tmp_path / "cache", max_bytes=KB)
    path = cache.local_path(s3_store, "any.svs", None, None)
    assert path.read_bytes() == b"inspect me"
    assert cache_files(cache) == [path.name]
    assert cache.local_path(s3_store, "any.svs", None, None) == path


def test_leftovers_of_a_dead_download_are_cleaned_up(s3_store: Store, tmp_path: Path):
    cache = SlideCache(tmp_path / "cache", max_bytes=100 * KB)
    stale = tmp_path / "cache" / "ab" / ("ab" + "0" * 62 + ".part-99999-deadbeef")
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"\0" * 90 * KB)  # reserved by a process that died
    digest, size = put(s3_store, "k", os.urandom(20 * KB))
    local = cache.local_path(s3_store, "k", digest, size)
    assert not stale.exists()
    assert cache_files(cache) == [local.name]


def _fetch(config, root: str, key: str, digest: str, size: int) -> tuple[str, int]:
    path = SlideCache(root, max_bytes=10 * 2**20).local_path(Store(config), key, digest, size)
    return str(path), path.stat().st_ino


def test_processes_asking_for_one_slide_share_one_download(s3_store: Store, tmp_path: Path):
    digest, size = put(s3_store, "shared.svs", os.urandom(2 * 2**20))
    args = (s3_store.config, str(tmp_path / "cache"), "shared.svs", digest, size)
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        results = pool.starmap(_fetch, [args] * 3)
    assert len(set(results)) == 1  # same path, same inode: the entry was never replaced
    cache = SlideCache(tmp_path / "cache", max_bytes=1)
    assert cache_files(cache) == [Path(results[0][0]).name]


@pytest.mark.parametrize("value", ["abc", "0", "-2"])
def test_bad_cache_size_setting_names_the_variable(monkeypatch, value):
    from smartccs.errors import CCSError
    from smartccs.slide.cache import default_max_bytes

    monkeypatch.setenv("CCS_SLIDE_CACHE_GB", value)
    with pytest.raises(CCSError, match="CCS_SLIDE_CACHE_GB"):
        default_max_bytes()
    monkeypatch.setenv("CCS_SLIDE_CACHE_GB", "1.5")
    assert default_max_bytes() == int(1.5 * 2**30)
