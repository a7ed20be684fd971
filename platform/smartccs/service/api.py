"""The service's HTTP API (FastAPI): submit a committed batch, follow it, read its results.

Every route but ``/healthz`` needs ``Authorization: Bearer <token>``; the token names a
center, which may submit and read only its own batches. Bodies are pydantic models, so a bad
one is a 422 naming the field.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict

from smartccs.adaptation.config import Method
from smartccs.batches import is_committed
from smartccs.ids import Id
from smartccs.results.tables import read_table
from smartccs.service.auth import TokenBook
from smartccs.service.config import ServiceConfig
from smartccs.service.records import BatchQueue, BatchRecord, batch_id
from smartccs.service.worker import service_store

API_VERSION = "v1"

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
    status_url: str
    results_url: str


class BatchStatus(BatchRecord):
    slides_total: int
    slides_done: int


class Service:
    """What the routes need: the store, the queue, the tokens and a way to wake a worker."""

    def __init__(self, cfg: ServiceConfig, wake: Any = None):
        self.cfg = cfg
        self.store = service_store(cfg)
        self.queue = BatchQueue(self.store, cfg.lease_s)
        self.tokens = TokenBook.load(cfg.tokens, cfg.tokens_source)
        self.wake = wake or (lambda: None)


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
    if record is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no batch {bid!r}")
    if record.center != center:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"batch {bid!r} is not {center}'s")
    return record


def create_app() -> FastAPI:
    app = FastAPI(
        title="SmartCCS adaptive screening",
        version="1",
        description="Cervical cytology screening with per-center test-time adaptation. "
        "Results on synthetic data say nothing clinical.",
        max_body_size=MAX_BODY_BYTES,
    )

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        service = _service()
        return {"status": "ok", "centers": len(service.tokens)}  # no store URI: unauthenticated

    @app.post(f"/{API_VERSION}/batches", status_code=202, response_model=Submitted)
    def submit(body: SubmitBatch, request: Request, center: CenterOf):
        service = _service()
        if body.center != center:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN, f"this token submits for {center}, not {body.center}"
            )
        if not is_committed(service.store, body.center, body.batch):
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                f"batch {body.center}/{body.batch} is not committed in {service.store.uri()} "
                "(upload it with `ccs upload` first)",
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
        base = str(request.url_for("batch_status", bid=bid))
        out = Submitted(
            batch_id=bid,
            state=record.state,
            new=new,
            status_url=base,
            results_url=f"{base}/results",
        )
        return JSONResponse(out.model_dump(), status_code=202 if new else 200)

    @app.get(f"/{API_VERSION}/batches/{{bid}}", response_model=BatchStatus)
    def batch_status(bid: str, center: CenterOf):
        record = _own(_service(), bid, center)
        return BatchStatus(
            **record.model_dump(),
            slides_total=len(record.slides),
            slides_done=sum(s.status != "pending" for s in record.slides),
        )

    @app.get(f"/{API_VERSION}/batches/{{bid}}/results")
    def batch_results(bid: str, center: CenterOf):
        service = _service()
        record = _own(service, bid, center)
        if record.state != "done":
            raise HTTPException(
                status.HTTP_409_CONFLICT, f"batch {bid} is {record.state}, results come when done"
            )
        t0 = time.perf_counter()
        table = read_table(service.store, "slides", centers=[record.center], batches=[record.batch])
        rows = table.to_pylist()  # the partition's committed rows: one run, never a mix
        run_id = rows[0]["run_id"] if rows else record.run_id
        return {
            "batch_id": bid,
            "center": record.center,
            "batch": record.batch,
            "run_id": run_id,
            "superseded": run_id != record.run_id,  # a later run (the batch job) replaced it
            "adaptation": record.adaptation,
            "slides": rows,
            "read_seconds": round(time.perf_counter() - t0, 4),
        }

    return app
