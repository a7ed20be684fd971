"""Fault injection and load on the screening service: many centers at once, the Screener
replica killed mid-batch, the Screener killed while it writes a batch's results.

After each, every batch ends done, with exactly one row per slide from one run and no
temporary object in the store's results; the service recovers by itself (Serve restarts the
replica, the batch's lease runs out, a worker takes it over as the next attempt).

Real parts: Serve on the shared local Ray over real HTTP, the store on moto's HTTP S3, tiny real
model artifacts (tests/toy_models.py). This module runs its own app (not the shared
``service`` fixture of tests/service_fixtures.py): it needs a dozen centers and a short lease.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
import requests

from smartccs.faults import arm, disarm_all, fired
from smartccs.manifest import Manifest
from smartccs.results.tables import read_table
from smartccs.service.auth import new_token
from smartccs.service.records import PREFIX, batch_id
from smartccs.store import Store
from smartccs.upload import upload_batch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
from load import run_load
from moto_buckets import moto_s3, new_s3_store
from service_fixtures import run_app
from toy_models import save_toy_models, toy_screening

pytestmark = [
    pytest.mark.faults,
    pytest.mark.ray,
    pytest.mark.s3,
    pytest.mark.slow,
    pytest.mark.usefixtures("ray_session"),
]

LOAD_CENTERS = 8
LEASE_S = 10.0
SCREENER = "ServeReplica:smartccs:Screener"


@pytest.fixture(scope="module")
def app(tiny_cohort: Path, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory):
    """The service on Serve over an S3 store: the tiny cohort's centers with batch b1 each,
    and ``LOAD_CENTERS`` more centers (l00, l01, ...) with one slide each; a 10 s lease.
    Yields (base URL, store, {center: token}, {center: slide ids of its b1})."""
    store = new_s3_store(s3_endpoint, "svcfault")
    dirs = {d.name: d for d in sorted(p.parent for p in tiny_cohort.glob("*/manifest.json"))}
    slides = {}
    for center, d in dirs.items():
        ref = upload_batch(d, center=center, batch="b1", store=store, progress=False)
        slides[center] = [s.slide_id for s in ref.manifest.slides]
    first = next(iter(dirs.values()))
    one = tmp_path_factory.mktemp("one-slide")
    entry = Manifest.loads((first / "manifest.json").read_bytes()).slides[0]
    (one / Path(entry.path).name).symlink_to(first / entry.path)
    for i in range(LOAD_CENTERS):
        ref = upload_batch(one, center=f"l{i:02d}", batch="b1", store=store, progress=False)
        slides[f"l{i:02d}"] = [s.slide_id for s in ref.manifest.slides]
    save_toy_models(store)
    tokens = {c: new_token() for c in slides}
    args = {
        "store": {"uri": store.config.uri, "s3": moto_s3(s3_endpoint)},
        "screening": toy_screening(tmp_path_factory.mktemp("svc")).model_dump(mode="json")
        | {"adapt": {"method": "smartccs"}},
        "tokens": {c: digest for c, (_, digest) in tokens.items()},
        "poll_s": 0.5,
        "workers_per_replica": 2,
        "lease_s": LEASE_S,
    }
    with run_app(args) as base:
        yield base, store, {c: t for c, (t, _) in tokens.items()}, slides


@pytest.fixture(autouse=True)
def faults(fault_root: Path):
    yield fault_root
    disarm_all(fault_root)


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _submit(base: str, token: str, center: str) -> str:
    r = requests.post(
        f"{base}/v1/batches", json={"center": center, "batch": "b1"}, headers=_auth(token)
    )
    assert r.status_code == 202, r.text
    return r.json()["batch_id"]


def _wait(base: str, token: str, bid: str, until: tuple[str, ...], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = requests.get(f"{base}/v1/batches/{bid}", headers=_auth(token), timeout=30).json()
        if body["state"] in until:
            return body
        time.sleep(0.2)
    pytest.fail(f"batch {bid} not {until} after {timeout:.0f} s: {body}")


def _screeners(dashboard: str) -> dict[str, int]:
    """Actor id -> pid of the live Screener replicas (the shared Ray's, by its dashboard)."""
    from ray.util.state import list_actors

    alive = list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], limit=1000)
    return {a.actor_id: a.pid for a in alive if a.class_name == SCREENER}


def assert_published_once(store: Store, center: str, slides: list[str], run_id: str) -> None:
    """One row per slide, all from ``run_id`` (cells too), no temporary object in results."""
    rows = read_table(store, "slides", centers=[center], batches=["b1"]).to_pylist()
    assert sorted(r["slide_id"] for r in rows) == sorted(slides)
    assert {r["run_id"] for r in rows} == {run_id}
    assert all(r["status"] != "failed" for r in rows), rows
    cells = read_table(store, "cells", centers=[center], batches=["b1"]).to_pylist()
    assert {c["run_id"] for c in cells} <= {run_id}
    assert len(cells) == sum(r["n_cells"] for r in rows)
    names = {key.rsplit("/", 1)[-1] for key in store.list("results")}
    assert names <= {"part-0.parquet", "_COMMITTED"}, sorted(names)


@pytest.mark.load
def test_many_centers_submitting_at_once_lose_nothing(app):
    """8 centers each submit their batch 3 times at the same moment: one registration per
    batch, distinct ids, every batch done with exactly one result row per slide. Small and
    without adaptation, to stay near a minute in CI: what is under load here is admission and
    the queue (bench/load.py runs 24 centers)."""
    base, store, tokens, slides = app
    centers = [c for c in slides if c.startswith("l")]
    batches = {c: (tokens[c], "b1", slides[c]) for c in centers}
    report = run_load(base, batches, resubmits=2, timeout_s=300, adapt="none")
    print({k: report[k] for k in ("centers", "posts", "admission", "wall_s", "slides_per_s")})
    assert report["errors"] == [] and report["lost"] == [], report
    assert report["posts"] == 3 * LOAD_CENTERS and report["slides"] == LOAD_CENTERS
    records = {k.rsplit("/", 1)[-1] for k in store.list(PREFIX) if k.endswith(".json")}
    assert {f"{batch_id(c, 'b1')}.json" for c in centers} <= records
    assert records <= {f"{batch_id(c, 'b1')}.json" for c in slides}, "no stray record"
    rows = read_table(store, "slides", centers=centers).to_pylist()
    assert sorted((r["center"], r["slide_id"]) for r in rows) == sorted(
        (c, s) for c in centers for s in slides[c]
    )


def test_screener_replica_killed_mid_batch_is_restarted_and_the_batch_taken_over(
    app, ray_session: str
):
    """SIGKILL the Screener replica while it screens a batch: Serve starts a new replica, the
    batch's lease runs out and a worker there screens it again as attempt 2."""
    base, store, tokens, slides = app
    center = sorted(c for c in slides if not c.startswith("l"))[0]
    bid = _submit(base, tokens[center], center)
    assert bid == batch_id(center, "b1")
    _wait(base, tokens[center], bid, ("running",), timeout=120)
    [(actor, pid)] = _screeners(ray_session).items()
    os.kill(pid, signal.SIGKILL)
    status = _wait(base, tokens[center], bid, ("done", "failed"), timeout=300)
    assert status["state"] == "done" and status["attempts"] == 2, status
    assert status["run_id"].endswith("-a2") and status["slides_done"] == len(slides[center])
    restarted = _screeners(ray_session)
    assert len(restarted) == 1 and actor not in restarted
    assert_published_once(store, center, slides[center], status["run_id"])
    res = requests.get(f"{base}/v1/batches/{bid}/results", headers=_auth(tokens[center]))
    assert res.status_code == 200 and len(res.json()["slides"]) == len(slides[center])


def test_screener_killed_while_writing_results_is_taken_over(app, faults: Path):
    """The Screener dies with the batch's cells file written and its slides file not: no
    reader sees the batch until attempt 2 publishes it whole."""
    base, store, tokens, slides = app
    center = sorted(c for c in slides if not c.startswith("l"))[1]
    arm(faults, "store.write", match=f"results/slides/center={center}/")
    bid = _submit(base, tokens[center], center)
    deadline = time.monotonic() + 120
    while not fired(faults, "store.write") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(fired(faults, "store.write")) == 1, "the Screener reached the slides file"
    assert read_table(store, "slides", centers=[center]).num_rows == 0, "nothing visible"
    early = requests.get(f"{base}/v1/batches/{bid}/results", headers=_auth(tokens[center]))
    assert early.status_code == 409, early.text
    status = _wait(base, tokens[center], bid, ("done", "failed"), timeout=300)
    assert status["state"] == "done" and status["attempts"] == 2, status
    assert_published_once(store, center, slides[center], status["run_id"])
