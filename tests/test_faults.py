"""Fault injection on the screening job: processes killed mid-stage, a misbehaving S3, a full
slide cache. After each fault the batch must end with exactly one row per slide, the same rows
a clean run gives, no temporary object in the store's results, and no person in the loop.

Real parts: the shared local Ray (Ray Data restarts killed actors and retries killed tasks), the
store on moto's HTTP S3 behind a TCP proxy that can drop, throttle or stall it
(tests/s3_proxy.py), OpenSlide reading slides from the local slide cache. Processes die at
fault points in the library (``smartccs.faults``: SIGKILL at a named place, armed through a
file), not after a sleep, so each fault hits the stage it names. docs/reliability.md lists
every case and the command that runs it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from smartccs.batches import load_batch
from smartccs.engine.config import ScreeningConfig
from smartccs.engine.job import ScreenJobConfig, run_screen_job
from smartccs.faults import FAULTS_ENV, arm, disarm_all, fired
from smartccs.results.tables import read_commit, read_table
from smartccs.service.config import ServiceConfig
from smartccs.service.records import BatchQueue, BatchRecord, batch_id
from smartccs.service.worker import Worker
from smartccs.slide.cache import SlideCache, default_root
from smartccs.store import S3Options, Store, StoreConfig
from smartccs.upload import upload_batch

sys.path.insert(0, str(Path(__file__).parent))
from s3_proxy import S3Proxy
from toy_models import save_toy_models, toy_screening

pytestmark = [
    pytest.mark.faults,
    pytest.mark.ray,
    pytest.mark.s3,
    pytest.mark.slow,
    pytest.mark.usefixtures("ray_session"),
]

COMPARED = ("status", "n_tiles", "tiles_read", "tiles_failed", "n_cells", "n_squamous")
"""Columns a fault must not change: a tile lost or counted twice shows in these."""


@pytest.fixture(scope="module")
def proxy(s3_endpoint: str):
    with S3Proxy(s3_endpoint) as p:
        yield p


@pytest.fixture(scope="module")
def centers(tiny_cohort: Path) -> dict[str, Path]:
    return {d.name: d for d in sorted(p.parent for p in tiny_cohort.glob("*/manifest.json"))}


@pytest.fixture(scope="module")
def store(proxy: S3Proxy, s3_endpoint: str, centers: dict[str, Path]) -> Store:
    """A bucket on moto, reached only through the proxy: each center's slides as batch b1,
    and toy models."""
    import boto3

    bucket = f"faults-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    s3 = S3Options(
        endpoint_url=proxy.url,
        region="us-east-1",
        access_key_id="testing",
        secret_access_key="testing",
    )
    store = Store(StoreConfig(uri=f"s3://{bucket}/store", s3=s3))
    for center, folder in centers.items():
        upload_batch(folder, center=center, batch="b1", store=store, progress=False)
    save_toy_models(store)
    return store


@pytest.fixture(scope="module")
def clean(store: Store, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple, dict]:
    """Every slide's row from one run without faults, keyed by (center, slide_id)."""
    cfg = toy_screening(tmp_path_factory.mktemp("clean"))
    run_screen_job(ScreenJobConfig(store=store.config, run_id="clean", screening=cfg))
    return {(r["center"], r["slide_id"]): r for r in read_table(store, "slides").to_pylist()}


@pytest.fixture(autouse=True)
def faults(fault_root: Path, proxy: S3Proxy):
    """The armed-points directory; whatever a test armed or broke is undone after it."""
    yield fault_root
    proxy.heal()
    disarm_all(fault_root)


def assert_one_row_per_slide(
    store: Store, center: str, batch: str, run_id: str, clean: dict | None = None
) -> list[dict]:
    """The batch's committed rows: one per manifest slide, all from ``run_id``, nothing failed,
    the same tiles and cells as the clean run; and no temporary object under results/."""
    manifest = load_batch(store, center, batch).manifest
    rows = read_table(store, "slides", centers=[center], batches=[batch]).to_pylist()
    assert sorted(r["slide_id"] for r in rows) == sorted(s.slide_id for s in manifest.slides)
    assert {r["run_id"] for r in rows} == {run_id}
    assert read_commit(store, center, batch).run_id == run_id
    for r in rows:
        assert r["status"] != "failed" and r["tiles_failed"] == 0, r
        if clean is not None:
            before = clean[(center, r["slide_id"])]
            assert {k: r[k] for k in COMPARED} == {k: before[k] for k in COMPARED}
            assert r["score"] == pytest.approx(before["score"], abs=1e-5)
    cells = read_table(store, "cells", centers=[center], batches=[batch]).to_pylist()
    assert {c["run_id"] for c in cells} <= {run_id}
    assert len(cells) == sum(r["n_cells"] for r in rows)
    assert_no_temporaries(store)
    return rows


def assert_no_temporaries(store: Store) -> None:
    names = {key.rsplit("/", 1)[-1] for key in store.list("results")}
    assert names <= {"part-0.parquet", "_COMMITTED"}, sorted(names)


def screen(store: Store, center: str, run_id: str, cfg: ScreeningConfig, batch: str = "b1"):
    run_screen_job(
        ScreenJobConfig(
            store=store.config, batches=[f"{center}/{batch}"], run_id=run_id, screening=cfg
        )
    )


def test_workers_killed_while_tiling(store: Store, clean, centers, faults: Path, tmp_path):
    """A planning task dies opening its slide and the scorer actor dies mid-way through
    reading a batch of tiles: Ray Data retries the task and restarts the actor."""
    center = sorted(centers)[0]
    arm(faults, "tiles.plan", match=f"incoming/{center}/")
    arm(faults, "tiles.read", match=f"incoming/{center}/")
    screen(store, center, "tiling-killed", toy_screening(tmp_path, tiles_per_call=4))
    assert fired(faults, "tiles.plan") and fired(faults, "tiles.read")
    assert os.getpid() not in fired(faults, "tiles.plan") + fired(faults, "tiles.read")
    assert_one_row_per_slide(store, center, "b1", "tiling-killed", clean)


def test_scorer_killed_during_inference(store: Store, clean, centers, faults: Path, tmp_path):
    """Split mode (reader actors feed the scorer through the object store): the scorer dies
    right after its detector ran on a batch; the restarted actor redoes that batch."""
    center = sorted(centers)[1]
    cfg = toy_screening(tmp_path, tiles_per_call=4)
    cfg = cfg.model_copy(update={"scorers": cfg.scorers.model_copy(update={"fused": False})})
    arm(faults, "cells.detect")
    screen(store, center, "inference-killed", cfg)
    assert fired(faults, "cells.detect")
    assert_one_row_per_slide(store, center, "b1", "inference-killed", clean)


def test_job_killed_during_the_parquet_write_is_rerun_cleanly(
    centers, clean, faults: Path, tmp_path: Path
):
    """``python -m jobs.screen`` (the batch door; its driver writes the tables) is SIGKILLed
    with the cells file written and the slides file staged but not renamed. Nothing of the run
    is visible to readers; the same job run again (what the RayJob's backoffLimit does)
    publishes the batch and removes the staging file the killed one left. A local store: an
    S3 PUT stages nothing, so only here can a killed writer leave a temporary."""
    import ray

    center = sorted(centers)[0]
    store = Store(StoreConfig(uri=str(tmp_path / "store")))
    upload_batch(centers[center], center=center, batch="b1", store=store, progress=False)
    save_toy_models(store)
    config = tmp_path / "screen.yaml"
    job = ScreenJobConfig(
        store=store.config,
        batches=[f"{center}/b1"],
        run_id="job-write",
        screening=toy_screening(tmp_path),
    )
    config.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    command = [sys.executable, "-m", "jobs.screen", "--config", str(config),
               "--address", ray.get_runtime_context().gcs_address]  # fmt: skip
    env = os.environ | {FAULTS_ENV: str(faults)}
    root = Path(__file__).parents[1]

    arm(faults, "store.write", match=f"results/slides/center={center}/")
    crashed = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    assert len(fired(faults, "store.write")) == 1
    staged = [k for k in store.list("results") if ".tmp-" in k]
    assert staged, "the kill came mid-write: the slides file staged, not renamed"
    assert read_table(store, "slides").num_rows == 0, "nothing of the killed run is visible"
    assert read_commit(store, center, "b1") is None

    again = run_screen_job(job)  # the job again, as its retry runs it (here, in-process)
    assert [(b.center, b.run_id, b.slides) for b in again.batches] == [(center, "job-write", 2)]
    assert_one_row_per_slide(store, center, "b1", "job-write", clean)


def test_s3_dropping_throttling_and_stalling_during_upload_and_screening(
    store: Store, clean, centers, proxy: S3Proxy, tmp_path: Path
):
    """The endpoint resets every connection, answers 503 SlowDown, stalls, at set moments of an
    upload (its lease, its manifest) and of a screening run (a worker's slide download, the
    driver's cells and slides PUTs): both finish as if nothing had happened. The 8 s outage
    under the upload's lease outlasts botocore's default five tries (about 5 s of backoff):
    the store's clients retry for about a minute (smartccs.store.S3_MAX_ATTEMPTS)."""
    center = sorted(centers)[1]
    proxy.fail("drop", 8, on="/_UPLOADING")
    proxy.fail("stall", 4, on="/manifest.json")
    upload_batch(centers[center], center=center, batch="flaky", store=store, progress=False)
    assert proxy.opened == 2 and set(proxy.hits) == {"drop", "stall"}, proxy.hits
    uploaded = load_batch(store, center, "flaky").manifest
    assert uploaded.slides == load_batch(store, center, "b1").manifest.slides

    proxy.hits.clear()
    proxy.fail("slowdown", 3, on=".svs")
    proxy.fail("drop", 4, on="/results/cells/")
    proxy.fail("stall", 3, on="/results/slides/")
    screen(store, center, "flaky-s3", toy_screening(tmp_path), batch="flaky")
    assert proxy.opened == 5 and set(proxy.hits) == {"drop", "slowdown", "stall"}, proxy.hits
    assert_one_row_per_slide(store, center, "flaky", "flaky-s3", clean)


def test_full_slide_cache_evicts_instead_of_failing(store: Store, clean, centers, tmp_path: Path):
    """The slide cache is full of other slides and its budget holds one of this batch's
    slides, not two: each download evicts what it must, and every slide is screened."""
    center = sorted(centers)[0]
    sizes = [s.bytes for s in load_batch(store, center, "b1").manifest.slides]
    budget = max(sizes) * 3 // 2
    cfg = toy_screening(tmp_path)
    cache = SlideCache(cfg.stream.cache_dir or default_root(), budget)
    old = []
    for i in range(3):  # a long-running node's cache: full, least recently used first
        data = os.urandom(budget // 3)
        entry = cache.root / f"{i:02x}" / f"{i:02x}{uuid.uuid4().hex}{uuid.uuid4().hex}"[:64]
        entry.parent.mkdir(parents=True, exist_ok=True)
        entry.write_bytes(data)
        old.append(entry)
    assert cache.total_bytes() > budget - max(sizes)
    stream = cfg.stream.model_copy(update={"cache_max_bytes": budget})
    screen(store, center, "cache-full", cfg.model_copy(update={"stream": stream}))
    assert_one_row_per_slide(store, center, "b1", "cache-full", clean)
    assert not any(p.exists() for p in old), "the old entries were evicted"
    # concurrent downloads may each reserve their slide before either can evict the other
    assert cache.total_bytes() <= budget + max(sizes)


def test_a_lost_answer_to_a_create_if_absent_put_is_recognised(
    store: Store, centers, proxy: S3Proxy
):
    """The upload lease, the commit marker and a service worker's claim are created with
    ``If-None-Match: *``. When S3 creates one but its answer is lost, the client's retry meets
    412 Precondition Failed for its own object: the writer must see that it won, not that
    someone else holds the batch (an upload refused, a batch claimed by nobody for ever)."""
    center = sorted(centers)[0]
    proxy.fail("lose", 0.3, on="/_UPLOADING")
    proxy.fail("lose", 0.3, on="/_COMMITTED")
    upload_batch(centers[center], center=center, batch="lost", store=store, progress=False)
    assert proxy.hits["lose"] >= 2, proxy.hits
    assert load_batch(store, center, "lost").manifest.slides
    assert not store.exists("incoming", center, "lost", "_UPLOADING"), "the lease is released"

    # the service's claims are the same call: a lost answer must not strand the batch
    queue = BatchQueue(store)
    record, _ = queue.register(BatchRecord(batch_id=batch_id(center, "lost"), center=center,
                                           batch="lost"))  # fmt: skip
    proxy.hits.clear()
    proxy.fail("lose", 0.3, on=".claim-1")
    claimed = queue.claim(record, "worker-a")
    assert proxy.hits["lose"] >= 1, proxy.hits
    assert claimed is not None and claimed.attempts == 1 and claimed.worker == "worker-a"
    assert queue.claim(record, "worker-b") is None, "and no other worker gets it"


def test_a_service_worker_heartbeat_outlives_a_store_outage(
    store: Store, proxy: S3Proxy, monkeypatch: pytest.MonkeyPatch
):
    """A heartbeat write that fails (here the store drops connections for longer than its
    client, limited to one try, retries) must not end the heartbeat: a silent batch is taken
    over by another worker while this one still screens it."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    worker = Worker(ServiceConfig(store=store.config, lease_s=0.4))  # a beat every 0.1 s
    record = BatchRecord(batch_id=batch_id("beat", "b1"), center="beat", batch="b1")
    record.state = "running"
    stop = threading.Event()
    beat = threading.Thread(target=worker._beat, args=(record, stop), daemon=True)
    beat.start()
    try:
        proxy.fail("drop", 4)
        assert proxy.wait_healed(60), "the outage opened (at the next beat) and closed"
        assert proxy.hits["drop"], "the outage met the heartbeat"
        healed = time.time()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            found = worker.queue.find(record.batch_id)
            if found and (found.heartbeat or 0) > healed:
                break
            time.sleep(0.2)
        else:
            pytest.fail("no heartbeat reached the store after the outage")
    finally:
        stop.set()
        beat.join(5)
