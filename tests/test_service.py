"""The adaptive screening service: Ray Serve on the shared local Ray, the store on the moto S3
server, requests over real HTTP.

Real parts: Serve (HTTP proxy, FastAPI ingress, multiplexed adapter replicas), Ray Data
inside the screening worker, OpenSlide on synthetic slides copied from S3, the result tables
on S3. The models are tiny random-weight artifacts (tests/toy_models.py): what they predict
means nothing; the service around them is what is pinned.
"""

from __future__ import annotations

import shlex
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests

from smartccs import layout
from smartccs.adaptation.state import history
from smartccs.batches import is_committed
from smartccs.manifest import Manifest
from smartccs.results.tables import read_table
from smartccs.service.records import batch_id

sys.path.insert(0, str(Path(__file__).parent))
from cli import run_ccs

# the `service` fixture (Serve over the moto S3 store) lives in tests/service_fixtures.py
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("ray_session")]


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _wait_done(base: str, token: str, bid: str, timeout: float = 420) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = requests.get(f"{base}/v1/batches/{bid}", headers=_auth(token), timeout=30).json()
        if body["state"] in ("done", "failed"):
            return body
        time.sleep(1)
    pytest.fail(f"batch {bid} not done after {timeout} s: {body}")


def _batch_folder(src: Path, dst: Path, center: str, batch: str) -> Path:
    """A copy of a center's folder whose manifest names ``batch``: ``ccs upload`` refuses a
    manifest for another batch than the one it uploads."""
    shutil.copytree(src, dst)
    given = Manifest.loads((dst / "manifest.json").read_bytes())
    (dst / "manifest.json").write_bytes(
        given.model_copy(update={"center": center, "batch": batch}).dumps()
    )
    return dst


def test_health_and_openapi_docs(service):
    base, *_ = service
    health = requests.get(f"{base}/healthz", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["centers"] == 2
    spec = requests.get(f"{base}/openapi.json", timeout=30).json()
    assert {"/v1/batches", "/v1/batches/{bid}", "/v1/batches/{bid}/results"} <= set(spec["paths"])
    assert requests.get(f"{base}/docs", timeout=30).status_code == 200


def test_a_center_submits_polls_and_reads_its_adapted_results(service):
    base, store, tokens, dirs, _ = service
    center = sorted(dirs)[0]
    r = requests.post(
        f"{base}/v1/batches", json={"center": center, "batch": "b1"}, headers=_auth(tokens[center])
    )
    assert r.status_code == 202, r.text
    bid = r.json()["batch_id"]
    assert bid == batch_id(center, "b1") and r.json()["new"] is True
    status = _wait_done(base, tokens[center], bid)
    assert status["state"] == "done", status
    manifest = Manifest.loads((dirs[center] / "manifest.json").read_bytes())
    assert status["slides_total"] == status["slides_done"] == len(manifest.slides)
    # issue 27: ISO 8601 UTC times, not epoch floats
    keys = ("submitted_at", "started_at", "finished_at")
    times = [datetime.fromisoformat(status[k]) for k in keys]
    assert all(t.tzinfo == UTC for t in times) and times == sorted(times), status
    assert status["finished_at"].endswith("Z") and isinstance(status["heartbeat"], str)
    res = requests.get(
        status_url := f"{base}/v1/batches/{bid}/results", headers=_auth(tokens[center])
    )
    assert res.status_code == 200, (status_url, res.text)
    body = res.json()
    assert sorted(s["slide_id"] for s in body["slides"]) == sorted(
        s.slide_id for s in manifest.slides
    )
    [card] = history(store, center)
    assert body["adaptation"] == f"smartccs:adapt-{center}/{card.version}"
    assert card.head["batches"] == [f"{center}/b1"]
    # the same tables the batch job writes
    rows = read_table(store, "slides", centers=[center], batches=["b1"]).to_pylist()
    assert {r["run_id"] for r in rows} == {body["run_id"]}
    assert {r["adaptation"] for r in rows} == {body["adaptation"]}
    # issue 27: each slide's status is its row's (it said scored where the row said inadequate)
    assert {s["slide_id"]: s["status"] for s in status["slides"]} == {
        r["slide_id"]: r["status"] for r in rows
    }
    assert {r["screened_at"] for r in body["slides"]} == {
        r["screened_at"].isoformat().replace("+00:00", "Z") for r in rows
    }

    # submitted twice: the same batch id, screened once
    again = requests.post(
        f"{base}/v1/batches", json={"center": center, "batch": "b1"}, headers=_auth(tokens[center])
    )
    assert again.status_code == 200 and again.json()["batch_id"] == bid
    assert again.json()["new"] is False
    time.sleep(2)
    later = requests.get(f"{base}/v1/batches/{bid}", headers=_auth(tokens[center])).json()
    assert later["attempts"] == 1 and later["run_id"] == status["run_id"]
    assert len(history(store, center)) == 1, "adapted once"

    # another center can neither read it nor submit for this center
    other = next(c for c in dirs if c != center)
    for url in (f"{base}/v1/batches/{bid}", f"{base}/v1/batches/{bid}/results"):
        assert requests.get(url, headers=_auth(tokens[other])).status_code == 403
    cross = requests.post(
        f"{base}/v1/batches", json={"center": center, "batch": "b1"}, headers=_auth(tokens[other])
    )
    assert cross.status_code == 403


def test_requests_without_a_valid_token_are_refused(service):
    base, _, _, dirs, _ = service
    center = sorted(dirs)[0]
    body = {"center": center, "batch": "b1"}
    assert requests.post(f"{base}/v1/batches", json=body).status_code == 401
    wrong = requests.post(f"{base}/v1/batches", json=body, headers=_auth("not-a-token"))
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    bid = batch_id(center, "b1")
    assert requests.get(f"{base}/v1/batches/{bid}").status_code == 401


def test_malformed_bodies_are_422_naming_the_field(service):
    base, _, tokens, dirs, _ = service
    center = sorted(dirs)[0]
    headers = _auth(tokens[center])
    missing = requests.post(f"{base}/v1/batches", json={"center": center}, headers=headers)
    assert missing.status_code == 422
    assert ["body", "batch"] in [e["loc"] for e in missing.json()["detail"]]
    bad_id = requests.post(
        f"{base}/v1/batches", json={"center": center, "batch": "../etc"}, headers=headers
    )
    assert bad_id.status_code == 422 and bad_id.json()["detail"][0]["loc"] == ["body", "batch"]
    bad_adapt = requests.post(
        f"{base}/v1/batches",
        json={"center": center, "batch": "b1", "adapt": "magic"},
        headers=headers,
    )
    assert bad_adapt.status_code == 422
    assert bad_adapt.json()["detail"][0]["loc"] == ["body", "adapt"]
    not_json = requests.post(f"{base}/v1/batches", data="{", headers=headers)
    assert not_json.status_code == 422


def test_an_uncommitted_batch_is_not_accepted(service):
    base, _, tokens, dirs, _ = service
    center = sorted(dirs)[0]
    r = requests.post(
        f"{base}/v1/batches",
        json={"center": center, "batch": "nope"},
        headers=_auth(tokens[center]),
    )
    assert r.status_code == 404 and "not committed" in r.json()["detail"]


def test_ccs_upload_submit_uploads_registers_and_follows_a_batch(
    service, monkeypatch, tmp_path: Path
):
    base, store, tokens, dirs, args = service
    center = sorted(dirs)[0]
    monkeypatch.setenv("AWS_ENDPOINT_URL", args["store"]["s3"]["endpoint_url"])
    monkeypatch.setenv("CCS_TOKEN", tokens[center])
    res = run_ccs(
        "upload", str(_batch_folder(dirs[center], tmp_path / "b2", center, "b2")),
        "--center", center, "--batch", "b2",
        "--store", args["store"]["uri"], "--submit", base, "--wait",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "committed" in res.stdout and f"{batch_id(center, 'b2')}: done" in res.stdout
    assert [c.head["batches"][-1] for c in history(store, center)][-1] == f"{center}/b2"
    monkeypatch.setenv("CCS_TOKEN", tokens[sorted(dirs)[1]])
    res = run_ccs(
        "upload", str(_batch_folder(dirs[center], tmp_path / "b3", center, "b3")),
        "--center", center, "--batch", "b3",
        "--store", args["store"]["uri"], "--submit", base,
    )  # fmt: skip
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert f"failed: POST {base}/v1/batches: 403 this token submits for" in res.stderr


def test_a_batch_survives_the_service_restarting_under_it(service):
    """The app is deleted while the batch runs (its worker dies mid-batch) and deployed again:
    the status is still there, and the new worker takes the batch over and finishes it."""
    from ray import serve

    from smartccs.service.app import build

    base, store, tokens, dirs, args = service
    center = sorted(dirs)[1]
    r = requests.post(
        f"{base}/v1/batches", json={"center": center, "batch": "b1"}, headers=_auth(tokens[center])
    )
    assert r.status_code == 202
    bid = r.json()["batch_id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = requests.get(f"{base}/v1/batches/{bid}", headers=_auth(tokens[center])).json()
        if state["state"] == "running":
            break
        time.sleep(0.2)
    assert state["state"] == "running", state
    serve.delete("smartccs")
    serve.run(build(args), name="smartccs", route_prefix="/")
    status = _wait_done(base, tokens[center], bid)
    assert status["state"] == "done" and status["attempts"] == 2, status
    rows = read_table(store, "slides", centers=[center], batches=["b1"]).to_pylist()
    assert {r["run_id"] for r in rows} == {status["run_id"]} and status["run_id"].endswith("-a2")
    assert len(rows) == status["slides_total"]


def test_a_batch_committed_but_refused_by_the_service_is_registered_by_the_command_printed(
    service, monkeypatch, tmp_path: Path
):
    """Issue 27: ``ccs upload --submit`` with a wrong token committed the batch, then failed
    with 401, and a re-run was refused as already committed. The error now says the batch was
    committed and prints the command that registers it; that command, with the right token,
    registers the committed batch without uploading anything again, and is refused for a
    folder whose slides are not the committed ones."""
    base, store, tokens, dirs, args = service
    center = sorted(dirs)[1]
    folder = _batch_folder(dirs[center], tmp_path / "b4", center, "b4")
    monkeypatch.setenv("AWS_ENDPOINT_URL", args["store"]["s3"]["endpoint_url"])
    monkeypatch.setenv("CCS_TOKEN", "not-a-token")
    upload = (
        "upload", str(folder), "--center", center, "--batch", "b4",
        "--store", args["store"]["uri"], "--submit", base, "--wait",
    )  # fmt: skip
    res = run_ccs(*upload)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    lines = res.stderr[res.stderr.index("ccs: error: ") :].splitlines()
    assert lines[0] == (
        f"ccs: error: batch {center}/b4 WAS committed to "
        f"{store.uri(layout.incoming(center, 'b4'))}, but registering it with the service "
        f"failed: POST {base}/v1/batches: 401 a valid center token is required "
        "(Authorization: Bearer <token>)"
    ), res.stderr
    assert lines[-1].strip() == shlex.join(["ccs", *upload]), res.stderr
    assert is_committed(store, center, "b4")
    bid = batch_id(center, "b4")
    unknown = requests.get(f"{base}/v1/batches/{bid}", headers=_auth(tokens[center]), timeout=30)
    assert unknown.status_code == 404

    committed = {k: store.sha256(k) for k in store.list(layout.incoming(center, "b4"))}
    monkeypatch.setenv("CCS_TOKEN", tokens[center])
    res = run_ccs(*shlex.split(lines[-1].strip())[1:])
    assert res.returncode == 0, res.stderr
    assert f"is already committed with the 2 slide(s) of {folder}; registering it" in res.stdout
    assert f"submitted as {bid}" in res.stdout and f"{bid}: done" in res.stdout
    assert {k: store.sha256(k) for k in store.list(layout.incoming(center, "b4"))} == committed

    other = _batch_folder(dirs[sorted(dirs)[0]], tmp_path / "other", center, "b4")
    res = run_ccs("upload", str(other), *upload[2:])
    assert res.returncode == 1 and "is already committed with other slides than" in res.stderr
