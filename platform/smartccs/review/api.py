"""The review workstation's routes on the service's app: a page for a cytologist's browser and
the JSON, tiles and crops it reads, behind the service's per-center tokens.

``/review/`` is the page (static: it asks for the token and keeps it in the tab's session
storage); everything under ``/review/v1/`` needs ``Authorization: Bearer <token>`` and answers
only for the token's center: another center's batch, slide, tile or review is a 404, as an
unknown one is, so ids do not leak. Slide pixels come only from committed batches, found
through their manifest (smartccs.slide.deepzoom). Signing off needs a reviewer's token
(``ServiceConfig.reviewers``): the review row's name comes from there, never from the page.
"""

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Response, status
from fastapi.encoders import jsonable_encoder
from fastapi.responses import FileResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles

from smartccs.errors import CCSError
from smartccs.ids import validate_id
from smartccs.results.reviews import Review, ReviewConflict, ReviewSubmission, append_review
from smartccs.results.schema import NOT_A_CELL, REVIEW_CATEGORIES
from smartccs.review.heatmap import UNIT as HEATMAP_UNIT
from smartccs.review.heatmap import batch_scale, heatmap_png
from smartccs.review.worklist import (
    NotFound,
    batch_rows,
    of_slide,
    slide_cells,
    slide_reviews,
    slide_row,
    worklist,
)
from smartccs.taxonomy import ABNORMAL_CLASSES

STATIC = Path(__file__).parent / "static"
VIEWER_ENV = "CCS_VIEWER_ASSETS"
"""Where OpenSeadragon's build is (``make env`` installs it under viewer/node_modules)."""
REVIEWED_FIELDS = ("run_id", "classifier", "detector", "encoder", "adaptation", "score")
"""What a sign-off records of the screening it reviewed, from the slide's row."""

_bearer = HTTPBearer(auto_error=False)


def viewer_assets() -> Path:
    """OpenSeadragon's build folder: $CCS_VIEWER_ASSETS, else the checkout's viewer/."""
    if os.environ.get(VIEWER_ENV):
        return Path(os.environ[VIEWER_ENV])
    rel = Path("viewer/node_modules/openseadragon/build/openseadragon")
    for root in (Path(__file__).resolve().parents[3], Path.cwd()):
        if (root / rel).is_dir():
            return root / rel
    return Path.cwd() / rel


def add_review_routes(app: FastAPI, service: Callable[[], Any], center_of: Callable) -> None:
    """Mount the page, its assets and ``/review/v1`` on ``app``; ``service()`` gives the
    process's Service (store, tokens, slides), ``center_of`` is the API's token dependency."""
    router = APIRouter(prefix="/review")
    Center = Annotated[str, Depends(center_of)]
    Creds = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]

    @router.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @router.get("/v1/me")
    def me(center: Center, creds: Creds) -> dict[str, Any]:
        return _me(service(), center, creds)

    @router.get("/v1/worklist")
    def get_worklist(center: Center) -> dict[str, Any]:
        items = worklist(service().store, center)
        return {"center": center, "slides": [i.model_dump(mode="json") for i in items]}

    @router.get("/v1/slides/{batch}/{slide_id}")
    def get_slide(batch: str, slide_id: str, center: Center) -> dict[str, Any]:
        return _slide_detail(service(), center, batch, slide_id)

    @router.get("/v1/slides/{batch}/{slide_id}/tiles/{level}/{tile}")
    def get_tile(batch: str, slide_id: str, level: int, tile: str, center: Center) -> Response:
        col, row = _tile_name(tile)
        with _as_404():
            data = service().slides.tile(center, batch, slide_id, level, col, row)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private"})

    @router.get("/v1/slides/{batch}/{slide_id}/cells/{cell_class}/{rank}.jpeg")
    def get_cell(batch: str, slide_id: str, cell_class: str, rank: int, center: Center):
        return _cell_crop(service(), center, batch, slide_id, cell_class, rank)

    @router.get("/v1/slides/{batch}/{slide_id}/heatmap.png")
    def get_heatmap(batch: str, slide_id: str, center: Center) -> Response:
        return _heatmap(service(), center, batch, slide_id)

    @router.post("/v1/batches/{batch}/reviews", status_code=201)
    def sign_off(
        batch: str,
        body: ReviewSubmission,
        creds: Creds,
        idempotency_key: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        return _sign_off(service(), creds, batch, body, idempotency_key)

    app.include_router(router)
    app.mount("/review/static", StaticFiles(directory=STATIC), name="review-static")
    app.mount(
        "/review/viewer", StaticFiles(directory=viewer_assets(), check_dir=False), name="viewer"
    )


@contextlib.contextmanager
def _as_404() -> Iterator[None]:
    """A slide, batch, tile or cell the token's center does not have is a 404, whatever the
    reason (unknown, another center's, uncommitted, out of range): ids never leak."""
    try:
        yield
    except CCSError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc).splitlines()[0]) from None


def _me(svc: Any, center: str, creds: HTTPAuthorizationCredentials | None) -> dict[str, Any]:
    """Who the token is, and the vocabularies the page offers (defined once, served here)."""
    who = svc.tokens.reviewer_of(creds.credentials) if creds else None
    return {
        "center": center,
        "reviewer": who[1] if who else None,
        "categories": list(REVIEW_CATEGORIES),
        "cell_classes": list(ABNORMAL_CLASSES),
        "not_a_cell": NOT_A_CELL,
    }


def _slide_detail(svc: Any, center: str, batch: str, slide_id: str) -> dict[str, Any]:
    with _as_404():
        slides = batch_rows(svc.store, center, batch, "slides")
        row = slide_row(slides, slide_id)
        view = svc.slides.describe(center, batch, slide_id)
    cells = batch_rows(svc.store, center, batch, "cells")
    return {
        "center": center,
        "batch": batch,
        "slide": jsonable_encoder(row),
        "view": view.model_dump(mode="json"),
        "cells": [c.model_dump() for c in slide_cells(cells, slide_id)],
        "heatmap": {
            "vmax": batch_scale(slides, cells),
            "unit": HEATMAP_UNIT,
            "scope": f"one scale for the slides of batch {batch}",
        },
        "reviews": jsonable_encoder(slide_reviews(svc.store, center, batch, slide_id)),
    }


def _heatmap(svc: Any, center: str, batch: str, slide_id: str) -> Response:
    """The slide's heatmap layer on its batch's scale (``review.heatmap``)."""
    with _as_404():
        slides = batch_rows(svc.store, center, batch, "slides")
        row = slide_row(slides, slide_id)
        view = svc.slides.describe(center, batch, slide_id)
    cells = batch_rows(svc.store, center, batch, "cells")
    size, mpp = (view.slide_width, view.slide_height), row["slide_mpp"] or view.mpp
    data = heatmap_png(of_slide(cells, slide_id), size, mpp, batch_scale(slides, cells))
    return Response(data, media_type="image/png", headers={"Cache-Control": "private"})


def _cell_crop(
    svc: Any, center: str, batch: str, slide_id: str, cell_class: str, rank: int
) -> Response:
    """A kept cell with some of its surroundings, as a JPEG for the gallery."""
    with _as_404():
        cells = slide_cells(batch_rows(svc.store, center, batch, "cells"), slide_id)
        cell = next((c for c in cells if (c.cell_class, c.rank) == (cell_class, rank)), None)
        if cell is None:
            raise NotFound(f"no {cell_class} cell of rank {rank} on slide {slide_id!r}")
        data = svc.slides.region(center, batch, slide_id, (cell.x0, cell.y0, cell.x1, cell.y1))
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private"})


def _sign_off(
    svc: Any,
    creds: HTTPAuthorizationCredentials | None,
    batch: str,
    body: ReviewSubmission,
    idempotency_key: str | None,
) -> dict[str, Any]:
    """Record a sign-off under the token's reviewer; a retried request with the same
    ``Idempotency-Key`` header is the same review (no second row)."""
    who = svc.tokens.reviewer_of(creds.credentials) if creds else None
    if who is None:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "signing off needs a reviewer's token (ccs token CENTER --reviewer NAME), "
            "not the center's upload token",
        )
    center, name = who
    review_id = uuid.uuid4().hex
    if idempotency_key is not None:
        try:
            review_id = validate_id(idempotency_key, "Idempotency-Key")
        except ValueError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    with _as_404():
        row = slide_row(batch_rows(svc.store, center, batch, "slides"), body.slide_id)
    review = Review(
        **body.model_dump(),
        center=center,
        batch=batch,
        reviewer=name,
        reviewed_at=datetime.now(UTC),
        review_id=review_id,
        **{k: row.get(k) for k in REVIEWED_FIELDS},
    )
    try:
        append_review(svc.store, review)
    except ReviewConflict as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    return review.model_dump(mode="json")


def _tile_name(tile: str) -> tuple[int, int]:
    """``<col>_<row>.jpeg`` -> (col, row); anything else is a 404."""
    stem, dot, ext = tile.partition(".")
    col, sep, row = stem.partition("_")
    if not (dot and ext == "jpeg" and sep and col.isdigit() and row.isdigit()):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "tiles are <col>_<row>.jpeg")
    return int(col), int(row)
