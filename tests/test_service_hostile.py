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
from pydantic import ValidationError

from smartccs import layout
from smartccs.batches import commit_batch
from smartccs.checksums import sha256_file
from smartccs.errors import CCSError
from smartccs.manifest import Manifest, SlideEntry
from smartccs.results.tables import PART_NAME
from smartccs.service.api import MAX_BODY_BYTES, create_app
from smartccs.service.auth import TokenBook, new_token, token_digest
from smartccs.service.config import ServiceConfig
from smartccs.service.records import batch_id
from smartccs.service.routes import BATCHES

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
    assert by_id[screened_b["good"]]["status"] in ("screened", "inadequate")  # the table's
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
    assert {k: s["status"] for k, s in by_id.items()} == {k: r["status"] for k, r in rows.items()}


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
    with pytest.raises(CCSError, match="needs a sha256 hex digest"):
        TokenBook({}, {token: ("c1", "Dr. X")})  # a reviewer's token, not its digest
    assert vars(TokenBook({"c1": digest})) == {"_digests": {"c1": digest}, "_reviewers": {}}
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


# --- issue 25, item 7: what an error answer may hold, and where URLs come from -------------
NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"]
"""Numbers Python's json module reads (NaN and Infinity are not JSON; 1e400 overflows to inf)
and no JSON encoder may write back."""


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} in an answer")


def _strict_json(text: str):
    """``text`` as RFC 8259 JSON: a NaN, an Infinity or an overflowing number is an error."""

    def number(s: str) -> float:
        if abs(value := float(s)) == float("inf"):
            raise ValueError(f"{s} in an answer")
        return value

    return json.loads(text, parse_constant=_refuse_constant, parse_float=number)


def _ingress_logs() -> dict[Path, int]:
    """The Ingress replicas' log files on the shared Ray, with their current sizes."""
    import ray._private.worker as ray_worker

    serve_logs = Path(ray_worker._global_node.get_logs_dir_path()) / "serve"
    return {p: p.stat().st_size for p in serve_logs.glob("replica_*Ingress*.log")}


def _logged_since(marks: dict[Path, int], access: str, count: int) -> str:
    """What the Ingress replicas logged after ``marks``, once ``count`` access lines
    ``access`` (method, route and status: ``"GET /v1/batches/{bid}/results 409"``) are in it,
    so that what the requests logged is there and read."""
    deadline = time.monotonic() + 15
    while True:
        text = ""
        for path in _ingress_logs():
            with path.open("rb") as f:
                f.seek(marks.get(path, 0))
                text += f.read().decode(errors="replace")
        if text.count(f" {access} ") >= count or time.monotonic() > deadline:
            assert text.count(f" {access} ") >= count, (access, count, text[-3000:])
            return text


def _assert_no_store(store, text: str) -> None:
    """No store URI, bucket or key prefix in an answer."""
    bucket = store.config.uri.split("/")[2]
    for secret in (store.config.uri, bucket, "incoming/", "results/", "runs/service", "s3://"):
        assert secret not in text, (secret, text)


def test_non_finite_numbers_in_any_body_are_422_naming_the_field_without_a_traceback(
    service, screened_b
):
    """Every route that takes a body, found by walking the app, is sent NaN, +-Infinity and
    +-1e400 in each field (and nested in an unknown one): each is a 422 whose ``loc`` names the
    field, the answer is strict JSON without the value, and the Ingress logs no traceback."""
    base, _, tokens, dirs, _ = service
    center = sorted(dirs)[0]
    routes = [
        (method, route.path)
        for route in create_app().routes
        if isinstance(route, APIRoute) and route.body_field is not None
        for method in sorted(route.methods)
    ]
    assert ("POST", "/v1/batches") in routes
    marks, sent = _ingress_logs(), 0
    for method, path in routes:
        url = base + path.replace("{bid}", screened_b["bid"])
        for field, wrap, loc in [
            ("center", "{}", ["center"]),
            ("batch", "{}", ["batch"]),
            ("adapt", "{}", ["adapt"]),
            ("weight", '[1, {{"x": {}}}]', ["weight", 1, "x"]),
        ]:
            for number in NON_FINITE:
                raw = json.dumps({"center": center, "batch": "b1", field: "@"})
                raw = raw.replace('"@"', wrap.format(number))
                r = requests.request(
                    method,
                    url,
                    data=raw,
                    headers=_auth(tokens[center]) | {"content-type": "application/json"},
                )
                assert r.status_code == 422, (path, raw, r.status_code, r.text[:300])
                [problem] = _strict_json(r.text)["detail"]
                assert problem["loc"] == ["body", *loc], (raw, problem)
                assert "input" not in problem, problem
                sent += 1
    logged = _logged_since(marks, f"{method} {path} 422", sent // len(routes))
    assert "Traceback" not in logged, logged[-3000:]


def test_results_that_do_not_match_their_commit_are_409_saying_what_to_do(service, screened_b):
    """A done batch whose committed slides file was changed after its commit, is missing, or
    whose results were retracted: a 409 (the stored state conflicts with the batch's record)
    that says to ask the operator, showing nothing of the store, with no traceback logged."""
    base, store, tokens, _, _ = service
    b, bid = screened_b["center"], screened_b["bid"]
    url, auth = f"{base}/v1/batches/{bid}/results", _auth(tokens[b])
    prefix = layout.results("slides", b, BATCH)
    marker = f"{layout.result_commit('slides', b, BATCH)}/{layout.COMMIT_MARKER}"
    part = f"{prefix}/{PART_NAME}"
    saved = {key: store.read_bytes(key) for key in (part, marker)}
    marks = _ingress_logs()
    answers = {}
    try:
        store.write_bytes(part, saved[part][:-1] + b"\0")
        answers["changed"] = requests.get(url, headers=auth)
        store.delete(part)
        answers["missing"] = requests.get(url, headers=auth)
        store.delete(marker)
        answers["retracted"] = requests.get(url, headers=auth)
    finally:
        for key, data in saved.items():
            store.write_bytes(key, data)
    for what, r in answers.items():
        assert r.status_code == 409, (what, r.status_code, r.text[:300])
        detail = r.json()["detail"]
        assert bid in detail and "operator" in detail, (what, detail)
        _assert_no_store(store, r.text)
    logged = _logged_since(marks, "GET /v1/batches/{bid}/results 409", len(answers))
    assert "Traceback" not in logged, logged[-3000:]
    assert requests.get(url, headers=auth).status_code == 200, "restored, it reads again"


def test_error_answers_name_what_is_missing_never_the_store(service, screened_b):
    """404s (a batch never uploaded, an unknown id), 403s and 401s say what is wrong in words;
    none shows the store's URI, bucket or any key."""
    base, store, tokens, dirs, _ = service
    a = sorted(dirs)[0]
    bid = screened_b["bid"]
    not_uploaded = requests.post(
        f"{base}/v1/batches",
        json={"center": a, "batch": "never-uploaded"},
        headers=_auth(tokens[a]),
    )
    assert not_uploaded.status_code == 404, not_uploaded.text
    detail = not_uploaded.json()["detail"]
    assert "never-uploaded" in detail and "not committed" in detail and "ccs upload" in detail
    answers = [
        not_uploaded,
        requests.get(f"{base}/v1/batches/b-{'0' * 20}", headers=_auth(tokens[a])),
        requests.get(f"{base}/v1/batches/b-{'0' * 20}/results", headers=_auth(tokens[a])),
        requests.get(f"{base}/v1/batches/{bid}/results", headers=_auth(tokens[a])),
        requests.get(f"{base}/v1/batches/{bid}"),
    ]
    assert [r.status_code for r in answers] == [404, 404, 404, 403, 401]
    for r in answers:
        _assert_no_store(store, r.text)


@pytest.mark.parametrize(
    "spoof",
    [
        {"Host": "evil.example"},
        {"Host": "evil.example:8443", "X-Forwarded-Proto": "https"},
        {"X-Forwarded-Host": "evil.example", "Forwarded": "host=evil.example;proto=https"},
    ],
)
def test_status_urls_come_from_the_config_never_the_request_headers(
    service, screened_b, spoof: dict[str, str]
):
    """The submit answer's URLs are built from ``public_url`` (the fixture sets it to the
    app's address): a client's Host or forwarding headers cannot point them elsewhere."""
    base, _, tokens, _, _ = service
    b, bid = screened_b["center"], screened_b["bid"]
    r = requests.post(
        f"{base}/v1/batches", json={"center": b, "batch": BATCH}, headers=_auth(tokens[b]) | spoof
    )
    assert r.status_code == 200, r.text  # submitted before: the same batch
    sub = r.json()
    assert sub["status_url"] == f"{base}/v1/batches/{bid}", sub
    assert sub["results_url"] == f"{base}/v1/batches/{bid}/results", sub
    assert requests.get(sub["status_url"], headers=_auth(tokens[b])).json()["batch_id"] == bid


def test_without_a_public_url_the_urls_are_paths_from_the_services_root():
    """Unset, ``public_url`` gives paths a client resolves against the URL it called; set, it
    is the base, path prefix included, and a base with a query or credentials is refused."""
    bid = batch_id("c1", "b1")
    assert ServiceConfig().public(f"{BATCHES}/{bid}") == f"/v1/batches/{bid}"
    cfg = ServiceConfig(public_url="https://screening.example.org/ccs/")
    assert cfg.public(f"{BATCHES}/{bid}") == f"https://screening.example.org/ccs/v1/batches/{bid}"
    for bad in ("https://x.org/?a=1", "https://u:p@x.org", "https://x.org/#f", "ftp://x.org"):
        with pytest.raises(ValidationError, match="public_url"):
            ServiceConfig(public_url=bad)
