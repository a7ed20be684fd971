"""The review workstation's HTTP API (issue 30): a center's worklist, its slides' Deep Zoom
tiles and cells, and sign-offs into the ``reviews`` table, each only for the token's center.
Real HTTP on uvicorn over a copy of the toy demo's store (tests/review_fixtures.py)."""

from __future__ import annotations

import io

import pytest
import requests
from PIL import Image

from smartccs.results.reviews import read_reviews
from smartccs.results.tables import read_table

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session")]


def _first_slide(site, center: str) -> tuple[str, str]:
    rows = read_table(site.store, "slides", centers=[center]).to_pylist()
    row = next(r for r in rows if r["status"] in ("screened", "inadequate"))
    return row["batch"], row["slide_id"]


def test_the_page_and_its_viewer_are_served_without_a_token(review_site):
    page = requests.get(f"{review_site.base}/review/")
    assert page.status_code == 200 and "openseadragon.min.js" in page.text
    osd = requests.get(f"{review_site.base}/review/viewer/openseadragon.min.js")
    assert osd.status_code == 200 and b"OpenSeadragon" in osd.content[:2000]
    assert requests.get(f"{review_site.base}/review/v1/worklist").status_code == 401


def test_a_center_s_worklist_holds_its_own_slides_only(review_site):
    a, b = review_site.centers
    for who, center in (("A", a), ("A-reviewer", a), ("B-reviewer", b)):
        r = requests.get(f"{review_site.base}/review/v1/worklist", headers=review_site.auth(who))
        assert r.status_code == 200, r.text
        got = r.json()
        want = read_table(review_site.store, "slides", centers=[center]).num_rows
        assert got["center"] == center and len(got["slides"]) == want > 0
        assert {s["review"] for s in got["slides"]} <= {"reviewed", "unreviewed"}
    me = requests.get(f"{review_site.base}/review/v1/me", headers=review_site.auth("A-reviewer"))
    assert (
        me.json()["reviewer"] == review_site.reviewer
        and "unsatisfactory" in me.json()["categories"]
    )


def test_a_slide_gives_its_view_cells_and_tiles(review_site):
    a, _ = review_site.centers
    batch, slide = _first_slide(review_site, a)
    url = f"{review_site.base}/review/v1/slides/{batch}/{slide}"
    detail = requests.get(url, headers=review_site.auth("A")).json()
    view = detail["view"]
    assert view["width"] > 0 and view["height"] > 0 and view["levels"] > 1 and view["mpp"] > 0
    top = view["levels"] - 1
    tile = requests.get(f"{url}/tiles/{top}/0_0.jpeg", headers=review_site.auth("A"))
    assert tile.status_code == 200 and tile.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(tile.content)).size[0] > 0
    for cell in detail["cells"][:2]:
        crop = requests.get(
            f"{url}/cells/{cell['cell_class']}/{cell['rank']}.jpeg", headers=review_site.auth("A")
        )
        assert crop.status_code == 200 and Image.open(io.BytesIO(crop.content)).size[0] > 0


def test_the_heatmap_layer_covers_the_slide_on_its_batch_s_scale(review_site):
    from smartccs.review.heatmap import GRID_MPP, batch_scale

    a, _ = review_site.centers
    batch, slide = _first_slide(review_site, a)
    url = f"{review_site.base}/review/v1/slides/{batch}/{slide}"
    detail = requests.get(url, headers=review_site.auth("A")).json()
    tables = (
        read_table(review_site.store, t, centers=[a], batches=[batch]) for t in ("slides", "cells")
    )
    vmax = batch_scale(*tables)
    assert (
        detail["heatmap"]["vmax"] == pytest.approx(vmax) and "batch" in detail["heatmap"]["scope"]
    )
    png = requests.get(f"{url}/heatmap.png", headers=review_site.auth("A"))
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(png.content))
    view = detail["view"]
    want = round(view["slide_width"] * view["mpp"] / GRID_MPP)
    assert image.mode == "RGBA" and abs(image.size[0] - want) <= 1
    other = requests.get(f"{url}/heatmap.png", headers=review_site.auth("B-reviewer"))
    assert other.status_code == 404


@pytest.mark.parametrize(
    "path",
    [
        "tiles/99/0_0.jpeg",
        "tiles/0/99999_0.jpeg",
        "tiles/-1/0_0.jpeg",
        "tiles/0/0_0.png",
        "tiles/0/x_y.jpeg",
        "cells/ASC-US/9999.jpeg",
        "cells/nope/0.jpeg",
    ],
)
def test_bad_tile_coordinates_levels_and_cells_are_4xx(review_site, path):
    a, _ = review_site.centers
    batch, slide = _first_slide(review_site, a)
    r = requests.get(
        f"{review_site.base}/review/v1/slides/{batch}/{slide}/{path}", headers=review_site.auth("A")
    )
    assert 400 <= r.status_code < 500, (path, r.status_code, r.text)


@pytest.mark.parametrize("slide", ["..%2F..%2Fmodels", "nope", "%2e%2e"])
def test_unknown_or_climbing_slide_ids_are_404_and_name_no_store_path(review_site, slide):
    a, _ = review_site.centers
    batch, _ = _first_slide(review_site, a)
    r = requests.get(
        f"{review_site.base}/review/v1/slides/{batch}/{slide}", headers=review_site.auth("A")
    )
    assert r.status_code == 404 and review_site.store.config.uri not in r.text


def test_another_center_s_slides_tiles_and_reviews_are_not_there(review_site):
    a, _ = review_site.centers
    batch, slide = _first_slide(review_site, a)
    url = f"{review_site.base}/review/v1/slides/{batch}/{slide}"
    for path in ("", "/tiles/0/0_0.jpeg", "/cells/ASC-US/0.jpeg"):
        r = requests.get(url + path, headers=review_site.auth("B-reviewer"))
        assert r.status_code == 404, (path, r.status_code)
    post = requests.post(
        f"{review_site.base}/review/v1/batches/{batch}/reviews",
        json={"slide_id": slide, "category": "NILM"},
        headers=review_site.auth("B-reviewer"),
    )
    assert post.status_code == 404


def test_a_reviewer_signs_off_and_the_row_names_them_and_what_they_reviewed(review_site):
    a, _ = review_site.centers
    batch, slide = _first_slide(review_site, a)
    body = {"slide_id": slide, "category": "LSIL", "comment": "koilocytes", "corrections": []}
    url = f"{review_site.base}/review/v1/batches/{batch}/reviews"
    upload_token = requests.post(url, json=body, headers=review_site.auth("A"))
    assert upload_token.status_code == 403, "the center's upload token cannot sign off"
    forged = requests.post(
        url, json=body | {"reviewer": "someone else"}, headers=review_site.auth("A-reviewer")
    )
    assert forged.status_code == 422, "the name comes from the token, never the page"
    keyed = review_site.auth("A-reviewer") | {"Idempotency-Key": "k-" + slide}
    r = requests.post(url, json=body, headers=keyed)
    assert r.status_code == 201, r.text
    again = requests.post(url, json=body, headers=keyed)
    assert again.status_code == 201, "a retry of the same sign-off is the same review"
    other = requests.post(url, json=body | {"category": "HSIL"}, headers=keyed)
    assert other.status_code == 409, "a reused key with another sign-off is refused, not dropped"
    rows = [
        x
        for x in read_reviews(review_site.store, centers=[a]).to_pylist()
        if x["slide_id"] == slide
    ]
    assert rows and rows[-1]["reviewer"] == review_site.reviewer and rows[-1]["category"] == "LSIL"
    screened = read_table(review_site.store, "slides", centers=[a], batches=[batch]).to_pylist()
    row = next(s for s in screened if s["slide_id"] == slide)
    assert rows[-1]["run_id"] == row["run_id"] and rows[-1]["classifier"] == row["classifier"]
    items = requests.get(
        f"{review_site.base}/review/v1/worklist", headers=review_site.auth("A")
    ).json()
    mine = next(s for s in items["slides"] if (s["batch"], s["slide_id"]) == (batch, slide))
    assert mine["review"] == "reviewed" and mine["category"] == "LSIL"
