"""Hostile requests to the screening service, over real HTTP to Serve on the shared Ray, with
the store on moto's S3 server (the ``service`` fixture, tests/service_fixtures.py).

Pinned here: another center's token is refused on every route and learns nothing; bodies that
are too big, of the wrong type, with unknown fields or climbing ids are refused with a clear
status naming the problem; a batch with a broken slide finishes with that slide failed and the
rest scored; tokens are compared in constant time and exist nowhere but with their holder.
"""

from __future__ import annotations

import hmac
import json
import time
from pathlib import Path

import pytest
import requests
from fastapi.routing import APIRoute

from smartccs import layout
from smartccs.batches import commit_batch
from smartccs.checksums import sha256_file
from smartccs.errors import CCSError
from smartccs.manifest import Manifest, SlideEntry
from smartccs.service.api import MAX_BODY_BYTES, create_app
from smartccs.service.auth import TokenBook, new_token, token_digest
from smartccs.service.records import batch_id

pytestmark = [
    pytest.mark.hostile,
    pytest.mark.ray,
    pytest.mark.s3,
    pytest.mark.slow,
    pytest.mark.usefixtures("ray_session"),
]

BATCH = "mixed"
"""Center B's batch: one good slide of the tiny cohort and one truncated copy of it."""


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def screened_b(service, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Center B's batch with a broken slide, put in place as any S3 client would, submitted
    with B's token and followed until it is done; returns what a leak would show of it."""
    base, store, tokens, dirs, _ = service
    b = sorted(dirs)[1]
    good = Manifest.loads((dirs[b] / "manifest.json").read_bytes()).slides[0]
    broken = tmp_path_factory.mktemp("svc-hostile") / "broken.svs"
    data = (dirs[b] / good.path).read_bytes()
    broken.write_bytes(data[: len(data) // 3])
    prefix = layout.incoming(b, BATCH)
    store.put_file(dirs[b] / good.path, f"{prefix}/{good.path}")
    store.put_file(broken, f"{prefix}/broken.svs")
    entry = SlideEntry(
        slide_id="broken", path="broken.svs", sha256=sha256_file(broken), bytes=len(data) // 3
    )
    commit_batch(store, Manifest(center=b, batch=BATCH, slides=[good, entry]))
    r = requests.post(
        f"{base}/v1/batches", json={"center": b, "batch": BATCH}, headers=_auth(tokens[b])
    )
    assert r.status_code == 202, r.text
    bid = r.json()["batch_id"]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = requests.get(f"{base}/v1/batches/{bid}", headers=_auth(tokens[b])).json()
        if status["state"] in ("done", "failed"):
            break
        time.sleep(0.5)
    results = requests.get(f"{base}/v1/batches/{bid}/results", headers=_auth(tokens[b]))
    return {
        "center": b,
        "bid": bid,
        "status": status,
        "results": results,
        "good": good.slide_id,
    }


def test_a_batch_with_a_broken_slide_is_done_and_names_the_slide(service, screened_b):
    status = screened_b["status"]
    assert status["state"] == "done", status
    assert status["slides_total"] == status["slides_done"] == 2
    by_id = {s["slide_id"]: s for s in status["slides"]}
    assert by_id[screened_b["good"]]["status"] == "scored"
    bad = by_id["broken"]
    assert bad["status"] == "failed"
    assert f"incoming/{screened_b['center']}/{BATCH}/broken.svs: " in bad["error"]
    assert "a TIFF that OpenSlide cannot open" in bad["error"]
    assert status["summary"]["failed"] == 1 and status["summary"]["slides"] == 2
    res = screened_b["results"]
    assert res.status_code == 200, res.text
    rows = {r["slide_id"]: r for r in res.json()["slides"]}
    assert sorted(rows) == sorted(by_id), "one row per slide"
    assert rows["broken"]["status"] == "failed" and rows["broken"]["score"] is None
    assert rows[screened_b["good"]]["score"] is not None


def _leak_markers(screened_b: dict) -> list[str]:
    """What only center B (or its batch's id) may learn: its batch's name, slide ids, run and
    the errors of its slides."""
    status = screened_b["status"]
    markers = [BATCH, screened_b["good"], status["run_id"]]
    return markers + [s["error"] for s in status["slides"] if s["error"]]


def test_every_route_refuses_another_centers_token_and_leaks_nothing(service, screened_b):
    """Every route of the app, found by walking it (a route added later is checked too), is
    called for center B's batch with center A's token: each API route answers 403 or 404,
    without a token 401, and no answer, public pages included, shows anything of B's."""
    base, store, tokens, dirs, _ = service
    b = screened_b["center"]
    a = next(c for c in dirs if c != b)
    markers = _leak_markers(screened_b)
    public = {"/healthz"}
    app = create_app()
    checked: set[tuple[str, str]] = set()
    for route in app.routes:
        path = getattr(route, "path", None)
        if path is None:
            continue
        url = base + path.replace("{bid}", screened_b["bid"])
        methods = sorted(getattr(route, "methods", None) or {"GET"})
        for method in methods:
            if method == "HEAD":
                continue
            body = {"center": b, "batch": BATCH} if method == "POST" else None
            answers = {
                "other": requests.request(method, url, json=body, headers=_auth(tokens[a])),
                "none": requests.request(method, url, json=body),
            }
            for who, r in answers.items():
                for marker in markers:
                    assert marker not in r.text, (method, path, who, marker, r.text)
            checked.add((method, path))
            if not isinstance(route, APIRoute) or path in public:
                for r in answers.values():  # public: nothing of B's, nor where the store is
                    assert b not in r.text and store.config.uri not in r.text, (path, r.text)
                continue
            assert answers["other"].status_code in (403, 404), (method, path, answers["other"])
            assert answers["none"].status_code == 401, (method, path, answers["none"].text)
            assert answers["none"].headers["www-authenticate"] == "Bearer"
    assert {
        ("POST", "/v1/batches"),
        ("GET", "/v1/batches/{bid}"),
        ("GET", "/v1/batches/{bid}/results"),
        ("GET", "/healthz"),
        ("GET", "/openapi.json"),
    } <= checked
    # B itself reads it: the markers were real
    own = requests.get(f"{base}/v1/batches/{screened_b['bid']}", headers=_auth(tokens[b]))
    assert own.status_code == 200 and screened_b["good"] in own.text


@pytest.mark.parametrize(
    "bid",
    ["b-" + "0" * 20, "b-" + "0" * 19 + "g", "..%2F..%2Fincoming", "b-%00", "B-" + "a" * 20],
)
def test_batch_ids_that_are_unknown_or_malformed_are_404(service, bid: str):
    base, _, tokens, dirs, _ = service
    token = tokens[sorted(dirs)[0]]
    for suffix in ("", "/results"):
        r = requests.get(f"{base}/v1/batches/{bid}{suffix}", headers=_auth(token))
        assert r.status_code == 404, (bid, r.status_code, r.text)


def test_an_oversize_body_is_413_before_it_is_parsed_or_authenticated(service):
    base, _, tokens, dirs, _ = service
    center = sorted(dirs)[0]
    big = json.dumps({"center": center, "batch": "b1", "pad": "x" * (MAX_BODY_BYTES + 1)})
    for headers in (_auth(tokens[center]), {}):
        r = requests.post(
            f"{base}/v1/batches",
            data=big,
            headers=headers | {"content-type": "application/json"},
        )
        assert r.status_code == 413, (r.status_code, r.text[:200])

    def chunks():  # no Content-Length: the limit counts what arrives
        for _ in range(64):
            yield b"x" * 4096

    r = requests.post(
        f"{base}/v1/batches",
        data=chunks(),
        headers=_auth(tokens[center]) | {"content-type": "application/json"},
    )
    assert r.status_code == 413, (r.status_code, r.text[:200])
    assert requests.get(f"{base}/healthz").status_code == 200, "the service is still up"


def test_unknown_fields_are_422_naming_the_field(service):
    base, _, tokens, dirs, _ = service
    center = sorted(dirs)[0]
    body = {"center": center, "batch": "b1", "priority": "urgent"}
    r = requests.post(f"{base}/v1/batches", json=body, headers=_auth(tokens[center]))
    assert r.status_code == 422, r.text
    [problem] = r.json()["detail"]
    assert problem["loc"] == ["body", "priority"] and problem["type"] == "extra_forbidden"


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"],
)
def test_a_body_that_is_not_json_is_422_naming_the_body(service, content_type: str | None):
    base, _, tokens, dirs, _ = service
    center = sorted(dirs)[0]
    data = json.dumps({"center": center, "batch": "b1"})
    headers = _auth(tokens[center]) | ({"content-type": content_type} if content_type else {})
    r = requests.post(f"{base}/v1/batches", data=data, headers=headers)
    assert r.status_code == 422, (content_type, r.status_code, r.text)
    assert r.json()["detail"][0]["loc"][0] == "body", r.text


@pytest.mark.parametrize("field", ["center", "batch"])
@pytest.mark.parametrize("bad", ["../b1", "/etc", "b1\n", "a\\b", "x" * 65, 7, None])
def test_climbing_or_malformed_ids_in_the_body_are_422_naming_them(service, field: str, bad):
    base, _, tokens, dirs, _ = service
    center = sorted(dirs)[0]
    body = {"center": center, "batch": "b1"} | {field: bad}
    r = requests.post(f"{base}/v1/batches", json=body, headers=_auth(tokens[center]))
    assert r.status_code == 422, (bad, r.status_code, r.text)
    assert r.json()["detail"][0]["loc"] == ["body", field]


def test_tokens_are_compared_in_constant_time_against_every_center(monkeypatch):
    """Which center a token belongs to is found by comparing its digest with every known
    digest through ``hmac.compare_digest``, never stopping at the first match, so neither
    the time to answer nor its order says which center, or how much of a digest, matched."""
    issued = {c: new_token() for c in ("c1", "c2", "c3")}
    book = TokenBook({c: digest for c, (_, digest) in issued.items()})
    calls: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    for presented, expected in [(issued["c1"][0], "c1"), (issued["c3"][0], "c3"), ("x", None)]:
        calls.clear()
        assert book.center_of(presented) == expected
        assert sorted(known for _, known in calls) == sorted(d for _, d in issued.values())
        assert {seen for seen, _ in calls} == {token_digest(presented)}


def test_only_digests_are_kept_and_no_token_is_stored_or_logged(service, screened_b):
    """The service's book holds digests only (a raw token in their place is refused), and
    after every route has been called with them no token is in the store or the Ray logs."""
    import ray._private.worker as ray_worker

    base, store, tokens, _, args = service
    token, digest = new_token()
    with pytest.raises(CCSError, match="needs a sha256 hex digest"):
        TokenBook({"c1": token})
    assert vars(TokenBook({"c1": digest})) == {"_digests": {"c1": digest}}
    assert set(args["tokens"].values()) == {token_digest(t) for t in tokens.values()}
    secrets = [t.encode() for t in tokens.values()]
    for key in store.list(""):
        data = store.read_bytes(key)
        assert not [s for s in secrets if s in data], key
    logs = Path(ray_worker._global_node.get_logs_dir_path())
    leaked = [
        str(p) for p in logs.rglob("*") if p.is_file() and any(s in p.read_bytes() for s in secrets)
    ]
    assert not leaked, leaked
    # the submission above used the token; it is known and works
    r = requests.get(
        f"{base}/v1/batches/{batch_id(screened_b['center'], BATCH)}",
        headers=_auth(tokens[screened_b["center"]]),
    )
    assert r.status_code == 200
