"""The screening service on Serve, shared by the service test modules (a pytest plugin,
registered in conftest.py).

Real parts: Serve on the shared local Ray, listening on 127.0.0.1 over real HTTP, the store on
the moto S3 server, the tiny cohort's slides uploaded through ``upload_batch``, tiny real model
artifacts (tests/toy_models.py).
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from smartccs.service.auth import new_token
from smartccs.upload import upload_batch

sys.path.insert(0, str(Path(__file__).parent))
from moto_buckets import moto_s3, new_s3_store
from toy_models import save_toy_models, toy_screening


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def run_app(args: dict) -> Iterator[str]:
    """serve.app's application with these arguments on the shared Ray, at a free port of
    127.0.0.1; yields its base URL and shuts Serve down after. The base URL is the app's
    ``public_url`` unless ``args`` names one (set in ``args``, so a test can read it)."""
    from ray import serve

    from smartccs.service.app import build

    port = free_port()
    base = args.setdefault("public_url", f"http://127.0.0.1:{port}")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(args), name="smartccs", route_prefix="/")
    try:
        yield base
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def service(tiny_cohort: Path, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory):
    """The app on Serve over an S3 store holding the tiny cohort's two centers and toy models;
    yields (base URL, store, {center: token}, {center: batch dir}, the app's args).

    Module-scoped: each module that uses it gets its own app, bucket and tokens."""
    store = new_s3_store(s3_endpoint, "svc")
    store_cfg = {"uri": store.config.uri, "s3": moto_s3(s3_endpoint)}
    dirs = {d.name: d for d in sorted(p.parent for p in tiny_cohort.glob("*/manifest.json"))}
    for center, d in dirs.items():
        upload_batch(d, center=center, batch="b1", store=store, progress=False)
    save_toy_models(store)
    tokens = {c: new_token() for c in dirs}
    screening = toy_screening(tmp_path_factory.mktemp("svc")).model_dump(mode="json")
    screening["adapt"] = {"method": "smartccs"}
    args = {
        "store": store_cfg,
        "screening": screening,
        "tokens": {c: digest for c, (_, digest) in tokens.items()},
        "poll_s": 0.5,
        "workers_per_replica": 2,  # two worker loops race for each batch: one claim wins
        "lease_s": 15,  # a killed worker's batch is taken over after 15 s of silence
    }
    with run_app(args) as base:
        yield base, store, {c: t for c, (t, _) in tokens.items()}, dirs, args
