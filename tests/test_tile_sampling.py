"""Which planned tiles a training run reads, and in what slide order (no Ray, no pixels)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from smartccs.data.tiles import TileShare, shuffled_slides, tile_draw
from smartccs.train.pretrain import PretrainConfig


def _tiles(n_slides: int = 4, side: int = 50) -> list[dict]:
    return [
        {"center": "c1", "batch": "b1", "slide_id": f"s{s}", "x0": x * 256, "y0": y * 256}
        for s in range(n_slides)
        for x in range(side)
        for y in range(side)
    ]


def test_tile_share_keeps_a_fixed_nested_subset_of_every_slide():
    tiles = _tiles()
    fifth = [t for t in tiles if TileShare(0.2, seed=0)(t)]
    tenth = [t for t in tiles if TileShare(0.1, seed=0)(t)]
    assert 0.18 < len(fifth) / len(tiles) < 0.22
    for s in range(4):  # every slide, not the first ones
        mine = [t for t in fifth if t["slide_id"] == f"s{s}"]
        assert 0.16 < len(mine) / 2500 < 0.24
    key = lambda t: (t["slide_id"], t["x0"], t["y0"])  # noqa: E731
    assert {key(t) for t in tenth} < {key(t) for t in fifth}, "a smaller share is inside"
    assert fifth == [t for t in tiles if TileShare(0.2, seed=0)(t)], "the same on every call"
    other = {key(t) for t in tiles if TileShare(0.2, seed=1)(t)}
    assert other != {key(t) for t in fifth}, "another seed, another subset"


def test_tile_draw_ignores_row_fields_other_than_identity_and_position():
    t = _tiles(1, 1)[0]
    assert tile_draw(t, 3) == tile_draw(t | {"image": None, "status": "ok"}, 3)
    assert tile_draw(t, 3) != tile_draw(t | {"x0": 512}, 3)


def test_shuffled_slides_mix_centers_whatever_the_listing_order():
    ids = [(c, f"{c}-{i}") for c in ("c1", "c2") for i in range(10)]
    rows = [{"center": c, "batch": "b1", "slide_id": s} for c, s in ids]
    first = shuffled_slides(rows, seed=0)
    assert sorted(map(str, first)) == sorted(map(str, rows)), "a permutation"
    assert first == shuffled_slides(list(reversed(rows)), seed=0), "listing order does not matter"
    assert {r["center"] for r in first[:5]} == {"c1", "c2"}, "the first slides read mix centers"
    assert first != shuffled_slides(rows, seed=1)


@pytest.mark.parametrize("share", [0, -0.1, 1.5])
def test_pretrain_refuses_a_tile_share_outside_0_1(share: float):
    with pytest.raises(ValidationError, match="tile_share"):
        PretrainConfig(run_name="p", tile_share=share)
