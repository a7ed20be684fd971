"""The service's HTTP API (FastAPI): submit a committed batch, follow it, read its results.

Every route but ``/healthz`` needs ``Authorization: Bearer <token>``; the token names a
center, which may submit and read only its own batches. Bodies are pydantic models, so a bad
one is a 422 naming the field. No answer names the store or a key in it: a center knows its
batches by center, batch and batch id, and the store's layout is the operator's business.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response, status
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from smartccs.adaptation.config import Method
from smartccs.batches import is_committed
from smartccs.ids import Id
from smartccs.results.tables import ResultsError, read_table
from smartccs.review.api import add_review_routes
from smartccs.service.auth import TokenBook
from smartccs.service.config import ServiceConfig
from smartccs.service.records import BatchQueue, BatchRecord, batch_id, is_batch_id
from smartccs.service.routes import BATCHES
from smartccs.store import open_store

if TYPE_CHECKING:
    from smartccs.slide.deepzoom import DeepZoomSlides

log = logging.getLogger(__name__)


RETRY_AFTER_S = 60
"""What a 503 asks a client to wait before it tries again."""

MAX_BODY_BYTES = 64 * 1024
"""Request bodies above this are refused (413) before they are parsed: a submission is a few
dozen bytes, and no unauthenticated caller should make a replica buffer megabytes."""


class SubmitBatch(BaseModel):
    """POST /v1/batches: a batch the center has uploaded and committed."""

    model_config = ConfigDict(extra="forbid")

    center: Id
    batch: Id
    adapt: Method | None = None


class Submitted(BaseModel):
    batch_id: str
    state: str
    new: bool
    status_url: str = Field(
        description="the config's public_url + /v1/batches/<id>; the path alone without one"
    )
    results_url: str = Field(description="status_url + /results")


NOT_FINITE = "finite_number"
"""The 422 ``type`` of a non-finite number in a body (pydantic's own name for the problem)."""


_NON_FINITE = object()


def _finite_or_marked(text: str) -> float | object:
    value = float(text)
    return value if math.isfinite(value) else _NON_FINITE


def _non_finite_at(value: Any) -> list[str | int] | None:
    """Where the first marked number is in a decoded document (depth first, in order)."""
    stack: list[tuple[Any, list[str | int]]] = [(value, [])]
    while stack:
        node, path = stack.pop()
        if node is _NON_FINITE:
            return path
        if isinstance(node, dict):
            children = list(node.items())
        elif isinstance(node, list):
            children = list(enumerate(node))
        else:
            continue
        stack.extend((child, [*path, key]) for key, child in reversed(children))
    return None


def finite_json(body: bytes) -> Any:
    """``body`` decoded as RFC 8259 JSON, or a 422 naming where a non-finite number is.

    Python's json module also reads ``NaN``, ``Infinity`` and ``-Infinity`` (not JSON) and
    turns ``1e400`` into inf; such a value reaching a model's error would be echoed in the
    422, whose encoding refuses it (a 500 and a traceback). Refused here, at decoding, it
    never reaches a model. Raised as an HTTPException: FastAPI passes those on from the
    body's decoding, in the shape of its own validation errors, without the value.
    """
    value = json.loads(body, parse_constant=lambda _: _NON_FINITE, parse_float=_finite_or_marked)
    where = _non_finite_at(value)
    if where is not None:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            [
                {
                    "type": NOT_FINITE,
                    "loc": ["body", *where],
                    "msg": "Input should be a finite number: NaN, Infinity and numbers "
                    "beyond the float range are not JSON",
                }
            ],
        )
    return value


class _FiniteJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = finite_json(await self.body())
        return self._json


class FiniteJSONRoute(APIRoute):
    """Every route of the app decodes its JSON body with :func:`finite_json`: set once on the
    router, so a route added later is covered too."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def finite(request: Request) -> Response:
            return await handler(_FiniteJSONRequest(request.scope, request.receive))

        return finite


UTC_TIME = "ISO 8601 in UTC (2026-11-21T09:30:00.123456Z)"


class BatchStatus(BatchRecord):
    """GET /v1/batches/<id>: the record, its times as ISO 8601 UTC strings (pydantic writes
    an aware datetime so; the record's epoch seconds become UTC datetimes on validation)."""

    submitted_at: datetime = Field(description=UTC_TIME)
    started_at: datetime | None = Field(default=None, description=UTC_TIME)
    finished_at: datetime | None = Field(default=None, description=UTC_TIME)
    heartbeat: datetime | None = Field(default=None, description=UTC_TIME)
    slides_total: int
    slides_done: int


_TIME = TypeAdapter(datetime)


def iso_times(row: dict[str, Any]) -> dict[str, Any]:
    """A results row with its datetimes (``screened_at``) written as the status's are."""
    return {
        k: _TIME.dump_python(v, mode="json") if isinstance(v, datetime) else v
        for k, v in row.items()
    }


class Service:
    """What the routes need: the store, the queue, the tokens and a way to wake a worker."""

    def __init__(self, cfg: ServiceConfig, wake: Any = None):
        self.cfg = cfg
        self.store = open_store(cfg.store)
        self.queue = BatchQueue(self.store, cfg.lease_s)
        reviewers = {d: (r.center, r.name) for d, r in cfg.reviewers.items()}
        self.tokens = TokenBook.load(cfg.tokens, cfg.tokens_source, reviewers)
        self.wake = wake or (lambda: None)

    @functools.cached_property
    def slides(self) -> DeepZoomSlides:
        """Deep Zoom of the store's committed slides (the review workstation's viewer),
        opened on first use through the bounded local slide cache."""
        from smartccs.slide.cache import SlideCache
        from smartccs.slide.deepzoom import DeepZoomSlides

        return DeepZoomSlides(self.store, SlideCache.from_env())


_bearer = HTTPBearer(auto_error=False)
_current: Service | None = None


def bind_service(service: Service) -> None:
    """Give this process's routes their service (Serve copies the app into each replica, so
    the app object itself cannot carry it)."""
    global _current
    _current = service


def _service() -> Service:
    if _current is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "service not started")
    return _current


def _center(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    """The center the bearer token belongs to; 401 without a valid one."""
    center = _service().tokens.center_of(creds.credentials) if creds else None
    if center is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "a valid center token is required (Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return center


CenterOf = Annotated[str, Depends(_center)]


def _own(service: Service, bid: str, center: str) -> BatchRecord:
    record = service.queue.find(bid)
    if record is None:  # a malformed id is not echoed: it is the caller's, not a batch's
        known = f"no batch {bid}" if is_batch_id(bid) else "no batch with this id"
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"{known} (ids are as POST {BATCHES} answers them)"
        )
    if record.center != center:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"batch {bid!r} is not {center}'s")
    return record


def _results(service: Service, record: BatchRecord) -> list[dict[str, Any]]:
    """A done batch's committed slide rows, or an answer that says what to do.

    409 when the store no longer holds what the batch's run published (the file changed or
    went missing after its commit, or the results were retracted): the stored state conflicts
    with the record, and waiting will not mend it. 503 when the store cannot be read now.
    The cause, with its store URI, goes to the operator's log, never to the caller."""
    bid, why = record.batch_id, "no committed results"
    try:
        table = read_table(service.store, "slides", centers=[record.center], batches=[record.batch])
        rows = table.to_pylist()  # the partition's committed rows: one run, never a mix
    except ResultsError as exc:
        rows, why = [], str(exc)
    except OSError as exc:
        log.warning("batch %s: the store could not be read: %s", bid, exc)
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            f"the results of batch {bid} cannot be read just now: retry in a minute",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        ) from None
    if not rows:  # a batch has one row per slide, and at least one slide
        log.warning("batch %s is done, but: %s", bid, why)
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"batch {bid} is done, but its stored results no longer match the run that "
            "published them (changed, removed or retracted since): ask the platform operator "
            "to re-run the batch (resubmitting it will not help)",
        )
    return rows


def _submitted(body: SubmitBatch, center: str) -> JSONResponse:
    """POST /v1/batches: queue the caller's committed batch (again, when it had failed); 202
    when it was queued now, 200 when it already was."""
    service = _service()
    if body.center != center:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, f"this token submits for {center}, not {body.center}"
        )
    if not is_committed(service.store, body.center, body.batch):
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"batch {body.batch!r} of center {body.center!r} is not committed: upload "
            "and commit it first (`ccs upload`)",
        )
    adapt = body.adapt or service.cfg.screening.adapt.method
    bid = batch_id(body.center, body.batch)
    record, new = service.queue.register(
        BatchRecord(batch_id=bid, center=body.center, batch=body.batch, adapt=adapt)
    )
    if not new and record.state == "failed":  # a failed batch is retried when resubmitted
        record = record.model_copy(update={"state": "queued", "error": None})
        service.queue.save(record)
        new = True
    if new:
        service.wake()
    base = service.cfg.public(f"{BATCHES}/{bid}")  # never from the request's Host
    out = Submitted(
        batch_id=bid,
        state=record.state,
        new=new,
        status_url=base,
        results_url=f"{base}/results",
    )
    return JSONResponse(out.model_dump(), status_code=202 if new else 200)


def _batch_results(bid: str, center: str) -> dict[str, Any]:
    """GET /v1/batches/<id>/results: a done batch's slide rows and which run wrote them."""
    service = _service()
    record = _own(service, bid, center)
    if record.state != "done":
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"batch {bid} is {record.state}, results come when done"
        )
    t0 = time.perf_counter()
    rows = _results(service, record)
    run_id = rows[0]["run_id"]
    return {
        "batch_id": bid,
        "center": record.center,
        "batch": record.batch,
        "run_id": run_id,
        "superseded": run_id != record.run_id,  # a later run (the batch job) replaced it
        "adaptation": record.adaptation,
        "slides": [iso_times(r) for r in rows],
        "read_seconds": round(time.perf_counter() - t0, 4),
    }


def create_app() -> FastAPI:
    """The API; its routes read their service from :func:`bind_service`."""
    app = FastAPI(
        title="SmartCCS adaptive screening",
        version="1",
        description="Cervical cytology screening with per-center test-time adaptation. "
        "Results on synthetic data say nothing clinical.",
        max_body_size=MAX_BODY_BYTES,
    )
    app.router.route_class = FiniteJSONRoute  # before any route is added

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        service = _service()
        return {"status": "ok", "centers": len(service.tokens)}  # no store URI: unauthenticated

    @app.post(BATCHES, status_code=202, response_model=Submitted)
    def submit(body: SubmitBatch, center: CenterOf):
        return _submitted(body, center)

    @app.get(f"{BATCHES}/{{bid}}", response_model=BatchStatus)
    def batch_status(bid: str, center: CenterOf):
        record = _own(_service(), bid, center)
        return BatchStatus(
            **record.model_dump(),
            slides_total=len(record.slides),
            slides_done=sum(s.status != "pending" for s in record.slides),
        )

    @app.get(f"{BATCHES}/{{bid}}/results")
    def batch_results(bid: str, center: CenterOf):
        return _batch_results(bid, center)

    add_review_routes(app, _service, _center)
    return app
