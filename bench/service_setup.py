"""What bench/service.py and bench/load.py both set up before they measure the service.

One cohort (the same synthetic slides uploaded as batch ``b1`` under every center), the
screening settings both benches run with, and serve/config.yaml's application started on the
local Ray at a free port. Imported by the benches' ``main`` only: it pulls in torch and Ray
(through ``screening``), which ``load.run_load``'s users (the tests) do not need.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from screening import bench_slides, pin_cpus

from smartccs.data.tiles import StreamConfig
from smartccs.engine.config import ScorerPool, ScreeningConfig
from smartccs.logs import configure_logging
from smartccs.models.refs import ModelRef
from smartccs.screening.slides import AdequacyConfig
from smartccs.store import Store
from smartccs.upload import upload_batch

BATCH = "b1"


def bench_cohort(cpus: int, slides: int, side_px: int, centers: int) -> tuple[Path, list[str]]:
    """Logging and CPU pinning for the run, then the folder of ``slides`` synthetic slides of
    ``side_px`` px and the names of ``centers`` centers (``c00``, ``c01``, ...)."""
    configure_logging(1)
    pin_cpus(cpus, True)
    folder = bench_slides(slides, side_px)
    return folder, [f"c{i:02d}" for i in range(centers)]


def upload_cohort(
    store: Store, folder: Path, centers: list[str], batch: str = BATCH
) -> dict[str, list[str]]:
    """The same slides of ``folder`` under every center, as ``batch`` of ``store``; returns
    center -> the batch's slide ids."""
    slide_ids = {}
    for c in centers:
        ref = upload_batch(folder, center=c, batch=batch, store=store, progress=False)
        slide_ids[c] = [s.slide_id for s in ref.manifest.slides]
    return slide_ids


def screening_config(model: ModelRef) -> ScreeningConfig:
    """The benches' screening settings (one reader, one scorer actor) with ``model`` as the
    classifier."""
    return ScreeningConfig(
        classifier_model=model.name,
        stream=StreamConfig(readers=1, reader_cpus=0.5, planner_cpus=0.25),
        scorers=ScorerPool(actors=1, cpus=1.0),
        adequacy=AdequacyConfig(min_squamous=5000),
    )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_app(
    store: Store,
    screening: ScreeningConfig,
    adapt: str,
    tokens: dict[str, tuple[str, str]],
    **extra: object,
) -> Iterator[str]:
    """serve/config.yaml's application on the Ray already started, serving ``store`` with
    ``screening`` and adaptation ``adapt`` to the centers of ``tokens`` (center -> token and
    its digest); ``extra``: further application arguments. Yields the base URL
    (``http://127.0.0.1:<port>``) and shuts Serve down on leaving."""
    from ray import serve

    from smartccs.service.app import build

    service_args = {
        "store": {"uri": store.config.uri},
        "screening": screening.model_dump(mode="json") | {"adapt": {"method": adapt}},
        "tokens": {c: digest for c, (_, digest) in tokens.items()},
        "poll_s": 0.5,
    } | extra
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(service_args), name="smartccs", route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
