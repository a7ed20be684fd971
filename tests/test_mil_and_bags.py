"""The classifier's pieces: cell crops, top-K bags per slide, the MIL head, the prototype bank."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smartccs.data.tiles import NO_TILE
from smartccs.models.mil import MILConfig, MILHead, pooled_embedding, slide_score
from smartccs.screening.bags import BagCollector, collect_bags
from smartccs.screening.cell_rows import TILE_ROW
from smartccs.screening.crops import crop_cells
from smartccs.taxonomy import GRADES
from smartccs.train.classifier import prototype_bank


def test_crops_are_centred_on_the_cell_and_padded_at_the_tile_edge():
    tile = torch.zeros(3, 40, 40)
    tile[:, 18:22, 28:32] = 1.0  # a 4 px "cell" centred at (30, 20)
    crops = crop_cells(tile, torch.tensor([[30.0, 20.0], [0.0, 0.0]]), crop_px=8, out_px=8)
    assert crops.shape == (2, 3, 8, 8)
    assert torch.equal(crops[0, 0, 2:6, 2:6], torch.ones(4, 4)) and crops[0].sum() == 3 * 16
    assert crops[1].sum() == 0  # the corner crop repeats the (black) edge, no wrap-around


def _rows(
    slide: str, cls: list[int], scores: list[float], dim: int = 4, tile: int = 0, tiles: int = 3
) -> dict[str, np.ndarray]:
    """One tile's rows: its cells, then its summary row (``TILE_ROW``)."""
    n = len(cls)
    return {
        "center": np.array(["c"] * n),
        "batch": np.array(["b"] * n),
        "slide_id": np.array([slide] * n),
        "n_tiles": np.full(n, tiles),
        "tile_index": np.full(n, tile, np.int64),
        "class_index": np.array(cls),
        "score": np.array(scores, np.float32),
        "box": np.zeros((n, 4)),
        "status": np.array(["ok"] * n, dtype=object),
        "error": np.array([""] * n, dtype=object),
        "n_squamous": np.array([5 if c == TILE_ROW else 0 for c in cls]),
        "embedding": np.array([[s] * dim for s in scores], np.float32),
    }


def test_bags_keep_the_top_k_cells_per_class_in_score_order_across_batches():
    first = _rows("s1", [0, 0, 3, TILE_ROW], [0.2, 0.9, 0.5, np.nan], tile=0)
    second = _rows("s1", [0, 0, TILE_ROW], [0.7, 0.1, np.nan], tile=1)
    bags = collect_bags([first, second], top_k=2, dim=4)
    bag = bags[("c", "b", "s1")]
    assert bag.scores[0].tolist() == pytest.approx([0.9, 0.7])
    assert bag.embeddings[0, :, 0].tolist() == pytest.approx([0.9, 0.7])  # rows travel together
    assert bag.mask[3].tolist() == [True, False] and not bag.mask[1].any()
    assert (bag.tiles_read, bag.n_squamous, bag.n_tiles) == (2, 10, 3) and bag.ok
    assert "1 of 3 tiles never reached" in bag.error, "the third tile never came"


def test_a_long_slide_logs_the_tiles_scored_before_it_completes(monkeypatch, caplog):
    """A 20 mm slide is minutes of tiles before its one "slide screened" line."""
    from smartccs.screening import bags as bags_module

    monkeypatch.setattr(bags_module, "TILES_LOG_EVERY_S", 0.0)
    tiles = [_rows("s1", [0, TILE_ROW], [0.5, np.nan], tile=i, tiles=3) for i in range(3)]
    with caplog.at_level("INFO", logger="smartccs.screening.bags"):
        collect_bags(tiles, top_k=2, dim=4)
    lines = [r.getMessage() for r in caplog.records if "tiles scored" in r.getMessage()]
    assert [line.split(" tiles scored")[0] for line in lines] == ["1", "2", "3"]


def test_a_tile_delivered_twice_counts_once_and_a_slide_completes_with_its_last_tile():
    collector = BagCollector(top_k=4, dim=4)
    t0 = _rows("s1", [0, TILE_ROW], [0.9, np.nan], tile=0, tiles=2)
    t1 = _rows("s1", [1, TILE_ROW], [0.4, np.nan], tile=1, tiles=2)
    assert collector.add(t0) == ([], 1)
    assert collector.add(t0) == ([], 0), "a retried task's repeat of tile 0 adds nothing"
    t1_cells = {k: v[:1] for k, v in t1.items()}
    t1_summary = {k: v[1:] for k, v in t1.items()}
    assert collector.add(t1_cells) == ([], 0), "cells wait for their tile's summary row"
    done, new = collector.add(t1_summary)
    assert new == 1 and [b.slide_id for b in done] == ["s1"]
    bag = done[0]
    assert (bag.tiles_read, bag.n_tiles, bag.n_squamous) == (2, 2, 10)
    assert bag.mask[0].sum() == 1 and bag.mask[1].sum() == 1 and bag.errors == []
    assert collector.add(t0) == ([], 0) and collector.finish() == []


def test_a_slide_missing_tiles_at_the_end_says_how_many():
    rows = _rows("s1", [TILE_ROW], [np.nan], tile=0, tiles=5)
    collector = BagCollector(top_k=2, dim=4)
    collector.add(rows)
    [bag] = collector.finish()
    assert bag.ok and bag.tiles_failed == 4 and "4 of 5 tiles never reached" in bag.error


def test_a_slide_that_failed_or_never_arrived_is_a_bag_with_a_reason():
    failed = _rows("s2", [TILE_ROW], [np.nan])
    failed["status"][:] = "error"
    failed["error"][:] = "s2.svs: no mpp"
    failed["tile_index"][:] = NO_TILE
    bags = collect_bags([failed], top_k=2, dim=4, expected=[("c", "b", "s2"), ("c", "b", "s3")])
    assert not bags[("c", "b", "s2")].ok and bags[("c", "b", "s2")].error == "s2.svs: no mpp"
    assert "no tile" in bags[("c", "b", "s3")].error


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_mil_head_ignores_padding_and_scores_one_minus_nilm(pooling: str):
    torch.manual_seed(0)
    head = MILHead(8, MILConfig(pooling=pooling, hidden=16, dropout=0.0, top_k=4)).eval()
    emb, scores = torch.randn(1, 6, 4, 8), torch.rand(1, 6, 4)
    mask = torch.zeros(1, 6, 4, dtype=torch.bool)
    mask[0, 0, :2] = True
    logits = head(emb, scores, mask)
    assert logits.shape == (1, len(GRADES))
    emb2, scores2 = emb.clone(), scores.clone()
    emb2[~mask], scores2[~mask] = 99.0, 0.5  # whatever sits in the padding
    assert torch.allclose(head(emb2, scores2, mask), logits, atol=1e-5)
    p = torch.softmax(logits, -1)
    assert torch.allclose(slide_score(logits), 1 - p[:, 0])


def test_prototypes_average_the_most_confident_slides_of_each_grade():
    from smartccs.screening.bags import SlideBag

    def bag(value: float) -> SlideBag:
        mask = np.zeros((6, 2), bool)
        mask[0, 0] = True
        emb = np.full((6, 2, 3), value, np.float32)
        return SlideBag("c", "b", str(value), emb, np.zeros((6, 2), np.float32),
                        np.zeros((6, 2, 4)), mask)  # fmt: skip

    bags = [bag(1.0), bag(2.0), bag(10.0)]
    grades = [0, 0, 4]
    probs = np.zeros((3, 7))
    probs[:, 0] = [0.9, 0.2, 0.0]
    probs[2, 4] = 0.8
    bank = prototype_bank(bags, grades, probs, per_grade=1, dim=3)
    assert bank[0].tolist() == [1.0] * 3, "only the most confident NILM slide"
    assert bank[4].tolist() == [10.0] * 3 and bank[1].abs().sum() == 0
    e = torch.from_numpy(bags[0].embeddings)
    assert pooled_embedding(e, torch.from_numpy(bags[0].mask)).tolist() == [1.0] * 3


def test_score_pooling_lets_a_few_confident_cells_outweigh_many_doubtful_ones():
    """One confident abnormal cell among 99 doubtful detections: the plain mean is ~the doubtful
    token, the score-weighted mean moves most of the way to the confident one."""
    torch.manual_seed(0)
    emb = torch.zeros(1, 6, 100, 8)
    emb[0, 0, 0] = 5.0  # the one real cell of class 0
    scores = torch.full((1, 6, 100), 0.01)
    scores[0, 0, 0] = 0.99
    mask = torch.ones(1, 6, 100, dtype=torch.bool)
    pooled = {}
    for how in ("mean", "score"):
        head = MILHead(8, MILConfig(pooling=how, hidden=16, dropout=0.0)).eval()
        torch.manual_seed(1)
        head.load_state_dict(MILHead(8, MILConfig(pooling="mean", hidden=16)).state_dict())
        real = head.pool(emb[:, :, :1], scores[:, :, :1], mask[:, :, :1])[0, 0]
        doubtful = head.pool(emb[:, :, 1:], scores[:, :, 1:], mask[:, :, 1:])[0, 0]
        both = head.pool(emb, scores, mask)[0, 0]
        pooled[how] = float(((both - doubtful).norm() / (real - doubtful).norm()).detach())
    assert pooled["mean"] == pytest.approx(0.01, abs=1e-3)  # 1 of 100
    assert pooled["score"] > 0.45  # 0.99 against 99 x 0.01


def test_screening_weights_give_nilm_and_abnormal_slides_half_each():
    from smartccs.train.classifier import grade_weights

    grades = [0] * 6 + [1, 1, 4]  # 6 NILM, 2 ASC-US, 1 HSIL
    w = grade_weights(grades, "screening")
    counts = np.bincount(grades, minlength=len(GRADES))
    assert w[0] * counts[0] == pytest.approx((w[1:] * counts[1:]).sum())
    assert w[1] == w[4] and w[2] == 0  # equal within the abnormal half; absent grades 0
    balanced = grade_weights(grades, "balanced")
    assert balanced[1] * 2 == pytest.approx(balanced[4])  # rarer grade counts more


def test_abnormal_logit_is_the_log_odds_of_the_slide_score():
    from smartccs.models.mil import abnormal_logit

    logits = torch.randn(5, len(GRADES))
    assert torch.allclose(torch.sigmoid(abnormal_logit(logits)), slide_score(logits), atol=1e-6)
