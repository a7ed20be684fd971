"""The review workstation over real HTTP, shared by its API and browser tests (a pytest
plugin, registered in conftest.py).

Real parts: the service's own FastAPI app (``smartccs.service.api.create_app``, the one Serve's
Ingress serves) on uvicorn at a free port of 127.0.0.1, over a copy of the toy demo's store
(real synthetic slides, screened by the real engine with toy models: tests/toy_study.py).
Serve itself is not started here: its wiring is covered by the service tests and the README
tour; the routes are the same app object.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests

from smartccs.results.tables import read_table
from smartccs.service.auth import new_token
from smartccs.store import Store, StoreConfig


@dataclass(frozen=True)
class ReviewSite:
    base: str
    store: Store
    centers: tuple[str, str]  # (A, B): A has a reviewer and an upload token, B a reviewer
    tokens: dict[str, str]  # "A", "A-reviewer", "B-reviewer" -> token
    reviewer: str  # A's reviewer's name, as the config says it

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def review_site(toy_demo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReviewSite]:
    import uvicorn

    from smartccs.service.api import Service, bind_service, create_app
    from smartccs.service.config import ServiceConfig

    root = tmp_path_factory.mktemp("review") / "store"
    shutil.copytree(toy_demo.store_dir, root)
    store = Store(StoreConfig(uri=str(root)))
    slides = read_table(store, "slides")
    a, b = sorted(set(slides.column("center").to_pylist()))[:2]
    made = {who: new_token() for who in ("A", "A-reviewer", "B-reviewer")}
    cfg = ServiceConfig(
        store=store.config,
        tokens={a: made["A"][1]},
        reviewers={
            made["A-reviewer"][1]: {"center": a, "name": "Dr. A. Reviewer"},
            made["B-reviewer"][1]: {"center": b, "name": "Dr. B. Reviewer"},
        },
    )
    bind_service(Service(cfg))
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{base}/healthz", timeout=1).ok:
                break
        except requests.ConnectionError:
            time.sleep(0.1)
    try:
        yield ReviewSite(
            base, store, (a, b), {w: t for w, (t, _) in made.items()}, "Dr. A. Reviewer"
        )
    finally:
        server.should_exit = True
        thread.join(timeout=10)


__all__ = ["ReviewSite", "review_site"]
