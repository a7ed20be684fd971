"""The adaptive screening service: Ray Serve on the shared local Ray, the store on the moto S3
server, requests over real HTTP.

Real parts: Serve (HTTP proxy, FastAPI ingress, multiplexed adapter replicas), Ray Data
inside the screening worker, OpenSlide on synthetic slides copied from S3, the result tables
on S3. The models are tiny random-weight artifacts (tests/toy_models.py): what they predict
means nothing; the service around them is what is pinned.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import requests

from smartccs.adaptation.state import history
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
    assert {s["status"] for s in status["slides"]} == {"scored"}
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


def test_ccs_upload_submit_uploads_registers_and_follows_a_batch(service, monkeypatch):
    base, store, tokens, dirs, args = service
    center = sorted(dirs)[0]
    monkeypatch.setenv("AWS_ENDPOINT_URL", args["store"]["s3"]["endpoint_url"])
    monkeypatch.setenv("CCS_TOKEN", tokens[center])
    res = run_ccs(
        "upload", str(dirs[center]), "--center", center, "--batch", "b2",
        "--store", args["store"]["uri"], "--submit", base, "--wait",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "committed" in res.stdout and f"{batch_id(center, 'b2')}: done" in res.stdout
    assert [c.head["batches"][-1] for c in history(store, center)][-1] == f"{center}/b2"
    monkeypatch.setenv("CCS_TOKEN", tokens[sorted(dirs)[1]])
    res = run_ccs(
        "upload", str(dirs[center]), "--center", center, "--batch", "b3",
        "--store", args["store"]["uri"], "--submit", base,
    )  # fmt: skip
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert f"ccs: error: POST {base}/v1/batches: 403 this token submits for" in res.stderr


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
