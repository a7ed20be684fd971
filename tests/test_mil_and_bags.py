"""The classifier's pieces: cell crops, top-K bags per slide, the MIL head, the prototype bank."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smartccs.data.tiles import NO_TILE
from smartccs.models.mil import MILConfig, MILHead, pooled_embedding, slide_score
from smartccs.screening.bags import collect_bags
from smartccs.screening.cells import TILE_ROW, crop_cells
from smartccs.taxonomy import GRADES
from smartccs.train.classifier import prototype_bank


def test_crops_are_centred_on_the_cell_and_padded_at_the_tile_edge():
    tile = torch.zeros(3, 40, 40)
    tile[:, 18:22, 28:32] = 1.0  # a 4 px "cell" centred at (30, 20)
    crops = crop_cells(tile, torch.tensor([[30.0, 20.0], [0.0, 0.0]]), crop_px=8, out_px=8)
    assert crops.shape == (2, 3, 8, 8)
    assert torch.equal(crops[0, 0, 2:6, 2:6], torch.ones(4, 4)) and crops[0].sum() == 3 * 16
    assert crops[1].sum() == 0  # the corner crop repeats the (black) edge, no wrap-around


def _rows(slide: str, cls: list[int], scores: list[float], dim: int = 4) -> dict[str, np.ndarray]:
    n = len(cls)
    return {
        "center": np.array(["c"] * n),
        "batch": np.array(["b"] * n),
        "slide_id": np.array([slide] * n),
        "n_tiles": np.full(n, 3),
        "tile_index": np.zeros(n, np.int64),
        "class_index": np.array(cls),
        "score": np.array(scores, np.float32),
        "box": np.zeros((n, 4)),
        "status": np.array(["ok"] * n, dtype=object),
        "error": np.array([""] * n, dtype=object),
        "n_squamous": np.array([5 if c == TILE_ROW else 0 for c in cls]),
        "embedding": np.array([[s] * dim for s in scores], np.float32),
    }


def test_bags_keep_the_top_k_cells_per_class_in_score_order_across_batches():
    first = _rows("s1", [0, 0, 3, TILE_ROW], [0.2, 0.9, 0.5, np.nan])
    second = _rows("s1", [0, 0, TILE_ROW], [0.7, 0.1, np.nan])
    bags = collect_bags([first, second], top_k=2, dim=4)
    bag = bags[("c", "b", "s1")]
    assert bag.scores[0].tolist() == pytest.approx([0.9, 0.7])
    assert bag.embeddings[0, :, 0].tolist() == pytest.approx([0.9, 0.7])  # rows travel together
    assert bag.mask[3].tolist() == [True, False] and not bag.mask[1].any()
    assert (bag.tiles_read, bag.n_squamous, bag.n_tiles) == (2, 10, 3) and bag.ok


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
