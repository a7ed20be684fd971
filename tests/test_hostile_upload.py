"""An adversarial center against the upload, the commit and the slide cache (issue 25).

Each test here reproduces a probe that once lost or leaked data: a concurrent upload deleting
a committed batch, a cache hit handing one center another center's slide, a file changed
between validation and copy, broken links left out silently, a killed upload locking its
batch, names too long for the store, keys cut at ``?``/``#``, names forging lines, coerced
manifest fields, a slide whose tiles ``ccs inspect`` cannot decode (docs/security.md,
docs/reliability.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path

import pytest
from cli import assert_one_line_error, run_ccs
from slide_factory import corrupt_jpeg_tile, write_disc_slide

from smartccs import layout, upload
from smartccs.batches import (
    UPLOAD_LEASE,
    LeaseBody,
    LeaseLostError,
    UploadLease,
    commit_batch,
    is_committed,
    load_batch,
)
from smartccs.errors import AlreadyCommittedError, ManifestError, SlideError, StoreError
from smartccs.manifest import Manifest, SlideEntry
from smartccs.slide.cache import SlideCache
from smartccs.slide.inspect import inspect_slide, read_pixels
from smartccs.slide.reader import Slide, open_slide
from smartccs.slide.tiling import TilingConfig, plan_tiles
from smartccs.store import Store
from smartccs.upload import UploadError, upload_batch

pytestmark = pytest.mark.hostile


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def folder_of(tmp_path: Path, name: str, n: int, size_px: int = 512) -> Path:
    d = tmp_path / name
    d.mkdir()
    for i in range(n):
        write_disc_slide(d / f"{name}-{i}.svs", size_px=size_px + 64 * i)
    return d


def committed_objects(store: Store, center: str, batch: str) -> dict[str, str]:
    """sha256 of every object of a committed batch's slides, read back from the store."""
    ref = load_batch(store, center, batch)
    return {s.path: sha(store.read_bytes(ref.slide_key(s.path))) for s in ref.manifest.slides}


def test_an_upload_that_validated_while_another_committed_leaves_the_batch_alone(
    tmp_path: Path, any_store: Store, monkeypatch: pytest.MonkeyPatch
):
    """The small upload commits while the large one validates; the large one then stops."""
    large = folder_of(tmp_path, "large", 3)
    small = folder_of(tmp_path, "small", 1)
    real_prepare = upload.prepare_batch

    def prepare_then_lose_the_race(directory, center, batch, **kw):
        prepared = real_prepare(directory, center, batch, **kw)
        if Path(directory) == large:  # the small upload runs to its commit meanwhile
            upload_batch(small, center=center, batch=batch, store=any_store, progress=False)
        return prepared

    monkeypatch.setattr(upload, "prepare_batch", prepare_then_lose_the_race)
    with pytest.raises(AlreadyCommittedError, match="already committed"):
        upload_batch(large, center="c1", batch="b1", store=any_store, progress=False)

    winner = {p.name: sha(p.read_bytes()) for p in small.iterdir()}
    assert committed_objects(any_store, "c1", "b1") == winner
    prefix = layout.incoming("c1", "b1")
    assert any_store.list(prefix) == sorted(
        [f"{prefix}/{n}" for n in winner] + [f"{prefix}/manifest.json", f"{prefix}/_COMMITTED"]
    )


@pytest.mark.s3
def test_a_cache_hit_never_hands_a_center_another_centers_slide(s3_store: Store, tmp_path: Path):
    """Center y claims center x's sha256 and size for random bytes of its own."""
    slide = write_disc_slide(tmp_path / "x.svs", size_px=512)
    data = slide.read_bytes()
    s3_store.put_file(slide, "incoming/x/b1/s.svs")
    cache = SlideCache(tmp_path / "cache", max_bytes=10 * len(data))
    x_local = cache.local_path(s3_store, "incoming/x/b1/s.svs", sha(data), len(data))
    s3_store.write_bytes("incoming/y/b1/s.svs", os.urandom(len(data)))

    with pytest.raises(SlideError, match=r"incoming/y/b1/s\.svs: sha256 mismatch"):
        cache.local_path(s3_store, "incoming/y/b1/s.svs", sha(data), len(data))
    assert [e.path for e in cache.entries()] == [x_local]
    # and the commit itself refuses the claim: it hashes what y stored
    claim = SlideEntry(slide_id="s", path="s.svs", sha256=sha(data), bytes=len(data))
    with pytest.raises(ManifestError, match="s.svs: sha256 in the store differs"):
        commit_batch(s3_store, Manifest(center="y", batch="b1", slides=[claim]))


@pytest.mark.s3
def test_a_cached_slide_is_tied_to_the_object_version_it_was_read_from(
    s3_store: Store, tmp_path: Path
):
    """Once the center's object is gone or replaced, its old bytes are not served on a hit."""
    first = write_disc_slide(tmp_path / "a.svs", size_px=512).read_bytes()
    s3_store.write_bytes("incoming/c/b/s.svs", first)
    cache = SlideCache(tmp_path / "cache", max_bytes=10**7)
    cache.local_path(s3_store, "incoming/c/b/s.svs", sha(first), len(first))
    s3_store.write_bytes("incoming/c/b/s.svs", bytes(reversed(first)))  # same size, new bytes
    with pytest.raises(SlideError, match="sha256 mismatch"):
        cache.local_path(s3_store, "incoming/c/b/s.svs", sha(first), len(first))
    s3_store.delete("incoming/c/b/s.svs")
    with pytest.raises(SlideError, match="not found in the store"):
        cache.local_path(s3_store, "incoming/c/b/s.svs", sha(first), len(first))


@pytest.mark.s3
def test_the_commit_trusts_s3s_own_full_object_sha256(s3_store: Store, tmp_path: Path):
    import boto3

    data = write_disc_slide(tmp_path / "s.svs", size_px=512).read_bytes()
    s3 = boto3.client("s3", endpoint_url=s3_store.config.s3.endpoint_url, region_name="us-east-1")
    for batch in ("b", "b2"):
        bucket, _, key = s3_store.path(f"incoming/c/{batch}/s.svs").partition("/")
        s3.put_object(Bucket=bucket, Key=key, Body=data, ChecksumAlgorithm="SHA256")
    assert s3_store.sha256("incoming/c/b/s.svs") == sha(data)
    entry = SlideEntry(slide_id="s", path="s.svs", sha256=sha(data), bytes=len(data))
    commit_batch(s3_store, Manifest(center="c", batch="b", slides=[entry]))
    lying = entry.model_copy(update={"sha256": "0" * 64})
    with pytest.raises(ManifestError, match="sha256 in the store differs"):
        commit_batch(s3_store, Manifest(center="c", batch="b2", slides=[lying]))


def test_a_file_changed_between_validation_and_copy_is_never_committed(
    tmp_path: Path, any_store: Store, monkeypatch: pytest.MonkeyPatch
):
    folder = folder_of(tmp_path, "scans", 2)
    real_prepare = upload.prepare_batch

    def prepare_then_change_a_file(directory, center, batch, **kw):
        prepared = real_prepare(directory, center, batch, **kw)
        victim = folder / "scans-1.svs"
        victim.write_bytes(bytes(reversed(victim.read_bytes())))  # same size, other bytes
        return prepared

    monkeypatch.setattr(upload, "prepare_batch", prepare_then_change_a_file)
    with pytest.raises(UploadError, match="scans-1.svs: changed after it was validated"):
        upload_batch(folder, center="c1", batch="b1", store=any_store, progress=False)
    assert not is_committed(any_store, "c1", "b1")


def test_broken_links_are_problems_and_a_link_to_a_real_slide_is_followed(
    tmp_path: Path, local_store: Store
):
    folder = folder_of(tmp_path, "scans", 1)
    (folder / "gone.svs").symlink_to(tmp_path / "nowhere.svs")
    (folder / "loop-a.svs").symlink_to(folder / "loop-b.svs")
    (folder / "loop-b.svs").symlink_to(folder / "loop-a.svs")
    with pytest.raises(UploadError) as exc:
        upload_batch(folder, center="c1", batch="b1", store=local_store, progress=False)
    lines = str(exc.value).splitlines()
    assert lines[0].startswith("3 problem(s)")
    assert any(ln.startswith("gone.svs: is a dangling symlink") for ln in lines), lines
    assert any(ln.startswith("loop-a.svs: is a symlink loop") for ln in lines), lines
    assert local_store.list("incoming") == []

    for name in ("gone.svs", "loop-a.svs", "loop-b.svs"):
        (folder / name).unlink()
    outside = write_disc_slide(tmp_path / "elsewhere.svs", size_px=704)
    (folder / "linked.svs").symlink_to(outside)
    ref = upload_batch(folder, center="c1", batch="b1", store=local_store, progress=False)
    assert ref.manifest.slide("linked").sha256 == sha(outside.read_bytes())
    assert committed_objects(local_store, "c1", "b1")["linked.svs"] == sha(outside.read_bytes())


def _foreign_lease(store: Store, age_s: float) -> None:
    beat = time.time() - age_s
    body = LeaseBody(token="other", host="another-host", pid=1, started=beat, beat=beat)
    assert store.put_if_absent(
        f"{layout.incoming('c1', 'b1')}/{UPLOAD_LEASE}", body.model_dump_json().encode()
    )


def test_a_live_lease_is_refused_in_one_line_and_break_lease_takes_it(
    tmp_path: Path, local_store: Store
):
    folder = folder_of(tmp_path, "scans", 1)
    _foreign_lease(local_store, age_s=5)
    args = ("upload", str(folder), "--center", "c1", "--batch", "b1")
    res = run_ccs(*args, "--store", local_store.config.uri)
    assert_one_line_error(res, "another upload of this batch is in progress", "--break-lease")
    res = run_ccs(*args, "--store", local_store.config.uri, "--break-lease")
    assert res.returncode == 0, res.stderr
    assert is_committed(local_store, "c1", "b1")


def test_a_lease_without_heartbeat_for_a_minute_is_taken_over(any_store: Store):
    _foreign_lease(any_store, age_s=120)
    with UploadLease(any_store, "c1", "b1") as lease:
        lease.check()
    assert not any_store.exists(layout.incoming("c1", "b1"), UPLOAD_LEASE)


def test_a_lease_beats_and_a_taken_lease_is_noticed_and_left_to_its_new_owner(
    any_store: Store,
):
    key = f"{layout.incoming('c1', 'b1')}/{UPLOAD_LEASE}"
    with UploadLease(any_store, "c1", "b1", heartbeat_s=0.2) as lease:
        first = LeaseBody.model_validate_json(any_store.read_bytes(key)).beat
        deadline = time.monotonic() + 10
        while LeaseBody.model_validate_json(any_store.read_bytes(key)).beat == first:
            assert time.monotonic() < deadline, "the lease never beat"
            time.sleep(0.1)
        thief = LeaseBody(
            token="thief", host=socket.gethostname(), pid=1, started=0, beat=time.time()
        )
        any_store.write_bytes(key, thief.model_dump_json().encode())
        with pytest.raises(LeaseLostError, match="another upload holds the batch"):
            lease.check()
    assert LeaseBody.model_validate_json(any_store.read_bytes(key)).token == "thief"


@pytest.mark.faults
def test_an_upload_killed_mid_copy_is_resumed_at_once_by_running_it_again(
    tmp_path: Path, local_store: Store
):
    from smartccs import faults

    folder = folder_of(tmp_path, "scans", 3)
    armed = tmp_path / "faults"
    armed.mkdir()
    faults.arm(armed, "upload.copy", "scans-1.svs")
    args = (
        "upload",
        str(folder),
        "--center",
        "c1",
        "--batch",
        "b1",
        "--store",
        local_store.config.uri,
    )
    env = {**os.environ, faults.FAULTS_ENV: str(armed)}
    killed = run_ccs(*args, env=env)
    assert killed.returncode == -9, killed.stderr
    assert local_store.exists(layout.incoming("c1", "b1"), UPLOAD_LEASE)
    assert not is_committed(local_store, "c1", "b1")

    again = run_ccs(*args)
    assert again.returncode == 0, again.stderr
    assert committed_objects(local_store, "c1", "b1") == {
        p.name: sha(p.read_bytes()) for p in folder.iterdir()
    }


def test_a_name_too_long_for_the_store_is_refused_before_any_write(
    tmp_path: Path, any_store: Store
):
    folder = folder_of(tmp_path, "scans", 1)
    if any_store.protocol == "file":  # fits this disk, not with the store's staging suffix
        long = "x" * 250 + ".svs"
    else:  # each name fits, the whole key is over S3's 1024 bytes
        long = "/".join(["y" * 200] * 5) + "/" + "x" * 40 + ".svs"
    target = folder / long
    target.parent.mkdir(parents=True, exist_ok=True)
    write_disc_slide(target, size_px=768)
    entries = [
        {
            "slide_id": f"s{i}",
            "path": p.relative_to(folder).as_posix(),
            "sha256": sha(p.read_bytes()),
            "bytes": p.stat().st_size,
        }
        for i, p in enumerate([folder / "scans-0.svs", target])
    ]
    doc = {"center": "c1", "batch": "b1", "slides": entries}
    (folder / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(UploadError, match=r"1 problem\(s\)") as exc:
        upload_batch(folder, center="c1", batch="b1", store=any_store, progress=False)
    assert "allows" in str(exc.value)
    assert any_store.list("incoming") == []


def test_keys_with_question_marks_and_hashes_are_listed_whole(any_store: Store):
    key = "incoming/c1/b1/what?is#this.svs"
    any_store.write_bytes(key, b"bytes")
    assert any_store.list("incoming") == [key]
    assert any_store.key_of(any_store.uri(key)) == key


def test_a_file_name_cannot_forge_a_line_in_the_problem_list(tmp_path: Path, local_store: Store):
    folder = folder_of(tmp_path, "scans", 1)
    (folder / "evil\nscans-0.svs: all good.svs").write_bytes(b"not a slide")
    with pytest.raises(UploadError) as exc:
        upload_batch(folder, center="c1", batch="b1", store=local_store, progress=False)
    lines = str(exc.value).splitlines()
    assert len(lines) == 2, lines  # the header and one problem, escaped
    assert lines[1].startswith("'evil\\nscans-0.svs: all good.svs': "), lines


@pytest.mark.parametrize(
    ("field", "value"), [("mpp", True), ("mpp", "0.5"), ("bytes", "123"), ("bytes", 12.5)]
)
def test_manifest_fields_are_strict_not_coerced(field: str, value: object):
    slide = {"slide_id": "s", "path": "s.svs", "sha256": "a" * 64, "bytes": 123, field: value}
    doc = json.dumps({"center": "c", "batch": "b", "slides": [slide]})
    with pytest.raises(ManifestError, match=rf"slides\.0\.{field}: "):
        Manifest.loads(doc)


def test_a_manifest_with_a_utf8_byte_order_mark_is_read(tmp_path: Path):
    slide = {"slide_id": "s", "path": "s.svs", "sha256": "a" * 64, "bytes": 123}
    doc = json.dumps({"center": "c", "batch": "b", "slides": [slide]}).encode()
    assert Manifest.loads(b"\xef\xbb\xbf" + doc) == Manifest.loads(doc)
    assert Manifest.loads("\ufeff" + doc.decode()) == Manifest.loads(doc)


def test_the_lease_holder_is_named_without_control_characters(any_store: Store):
    body = LeaseBody(token="t", host="evil\nhost", pid=1, started=time.time(), beat=time.time())
    any_store.put_if_absent(
        f"{layout.incoming('c1', 'b1')}/{UPLOAD_LEASE}", body.model_dump_json().encode()
    )
    with pytest.raises(StoreError) as exc:
        UploadLease(any_store, "c1", "b1").__enter__()
    assert "\n" not in str(exc.value)


# --- a tile that cannot be decoded (issue 27, 8) ------------------------------------------


@pytest.fixture(scope="module")
def whole_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4096 px at 0.25 µm/px: levels of 16 x 16 down to 1 x 1 JPEG tiles of 256 px (pages 0-4);
    the 8 µm/px foreground mask is read from the last, level 4."""
    return write_disc_slide(tmp_path_factory.mktemp("whole") / "whole.svs", size_px=4096)


@pytest.mark.parametrize(
    ("page", "tile"), [(4, 0), (1, None)], ids=["the-mask-level", "every-tile-of-level-1"]
)
def test_a_slide_whose_tiles_inspect_cannot_decode_is_refused_at_upload(
    tmp_path: Path, local_store: Store, whole_slide: Path, page: int, tile: int | None
):
    """``ccs inspect`` refused a corrupt JPEG tile of the level it reads whole, and the upload
    took the slide (it read that level too, for its warning, and dropped the error). Both now
    read pixels with ``read_pixels``: the mask level whole and one tile of every level (level 1
    is corrupt in every tile here, so whichever tile is taken), and say the same line, naming
    the file, the level and libjpeg's reason; nothing is written, and the good slide uploads."""
    folder = tmp_path / "scans"
    folder.mkdir()
    write_disc_slide(folder / "good.svs", size_px=1024)
    bad = corrupt_jpeg_tile(whole_slide, folder / "corrupt.svs", page, tile)
    with pytest.raises(SlideError) as exc:
        inspect_slide(str(bad))
    said = str(exc.value)
    assert said.startswith(f"corrupt.svs: cannot read level {page} region at "), said
    assert "Corrupt JPEG data" in said and "\n" not in said, said
    with pytest.raises(UploadError) as exc:
        upload_batch(folder, center="c1", batch="b1", store=local_store, progress=False)
    assert str(exc.value).splitlines() == [f"1 problem(s) in {folder}, nothing uploaded:", said]
    assert local_store.list("incoming") == []
    bad.unlink()
    ref = upload_batch(folder, center="c1", batch="b1", store=local_store, progress=False)
    assert [s.slide_id for s in ref.manifest.slides] == ["good"]


def test_ccs_upload_refuses_what_ccs_inspect_cannot_read(
    tmp_path: Path, local_store: Store, whole_slide: Path
):
    folder = tmp_path / "scans"
    folder.mkdir()
    bad = corrupt_jpeg_tile(whole_slide, folder / "corrupt.svs", 4, 0)
    inspected = run_ccs("inspect", str(bad))
    assert_one_line_error(inspected, "corrupt.svs: cannot read level 4 region", "Corrupt JPEG")
    reason = inspected.stderr.strip().removeprefix("ccs: error: ")
    res = run_ccs("upload", str(folder), "--center", "c1", "--batch", "b1", "--store",
                  local_store.config.uri)  # fmt: skip
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.splitlines()[-1].strip() == reason, res.stderr  # indented under ccs: error
    assert local_store.list("incoming") == []


def test_reading_pixels_costs_the_mask_level_and_one_tile_per_level(
    whole_slide: Path, monkeypatch: pytest.MonkeyPatch
):
    """What keeps validation cheap: beyond planning's reads of the mask level, one read per
    level, each inside one stored tile, the level-0 one under a planned tile (the cells)."""
    reads: list[tuple[int, int, int, int, int]] = []
    real = Slide.read_rgba

    def spy(self: Slide, level: int, x0: int, y0: int, w: int, h: int):
        reads.append((level, x0, y0, w, h))
        return real(self, level, x0, y0, w, h)

    monkeypatch.setattr(Slide, "read_rgba", spy)
    with open_slide(whole_slide) as slide:
        plan = plan_tiles(slide, TilingConfig())
        planning = list(reads)
        reads.clear()
        read_pixels(slide, TilingConfig())
        info = slide.info
    assert reads[: len(planning)] == planning and {r[0] for r in planning} == {4}
    probes = reads[len(planning) :]
    assert [level for level, *_ in probes] == list(range(len(info.level_dimensions)))
    for level, x0, y0, w, h in probes:
        d = info.level_downsamples[level]
        assert (x0 / d) % 256 == 0 and (y0 / d) % 256 == 0 and w <= 256 and h <= 256
    _, x0, y0, w, h = probes[0]
    assert any(
        t.x0 <= x0 and x0 + w <= t.x0 + t.w0 and t.y0 <= y0 and y0 + h <= t.y0 + t.h0
        for t in plan.tiles
    ), (probes[0], plan.tiles)
