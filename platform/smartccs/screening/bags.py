"""Per slide, the top-K cells of each abnormal class: the bag the MIL head reads.

Cell rows stream out of the ``CellScorer`` pool in any order; this keeps, per slide and class,
only the K best so far (memory: slides x 6 x K embeddings, whatever the slide size), and counts
tiles, failed tiles and normal squamous cells for adequacy. A slide whose every row is an error
becomes a bag with its reason and no cells.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from smartccs.data.tiles import NO_TILE, STATUS_OK
from smartccs.screening.cells import TILE_ROW
from smartccs.taxonomy import ABNORMAL_CLASSES

N_CLASSES = len(ABNORMAL_CLASSES)


@dataclass
class SlideBag:
    """One slide's top cells per abnormal class, padded to K (``mask`` marks real cells)."""

    center: str
    batch: str
    slide_id: str
    embeddings: np.ndarray  # (6, K, D) float32
    scores: np.ndarray  # (6, K) float32, 0 where padded
    boxes: np.ndarray  # (6, K, 4) level-0 px, NaN where padded
    mask: np.ndarray  # (6, K) bool
    n_tiles: int = 0
    tiles_read: int = 0
    n_squamous: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.center, self.batch, self.slide_id)

    @property
    def ok(self) -> bool:
        return self.tiles_read > 0

    @property
    def error(self) -> str:
        return self.errors[0] if self.errors else ""


class _Acc:
    def __init__(self, k: int, dim: int):
        self.k, self.dim = k, dim
        self.emb = [np.zeros((0, dim), np.float32) for _ in range(N_CLASSES)]
        self.score = [np.zeros(0, np.float32) for _ in range(N_CLASSES)]
        self.box = [np.zeros((0, 4), np.float64) for _ in range(N_CLASSES)]
        self.n_tiles = self.read = self.squamous = 0
        self.errors: list[str] = []

    def add(self, c: int, emb: np.ndarray, score: np.ndarray, box: np.ndarray) -> None:
        e = np.concatenate([self.emb[c], emb])
        s = np.concatenate([self.score[c], score])
        b = np.concatenate([self.box[c], box])
        if len(s) > self.k:
            top = np.argpartition(-s, self.k - 1)[: self.k]
            e, s, b = e[top], s[top], b[top]
        self.emb[c], self.score[c], self.box[c] = e, s, b

    def bag(self, center: str, batch: str, slide_id: str) -> SlideBag:
        k = self.k
        emb = np.zeros((N_CLASSES, k, self.dim), np.float32)
        score = np.zeros((N_CLASSES, k), np.float32)
        box = np.full((N_CLASSES, k, 4), np.nan)
        mask = np.zeros((N_CLASSES, k), bool)
        for c in range(N_CLASSES):
            order = np.argsort(-self.score[c], kind="stable")
            n = len(order)
            emb[c, :n], score[c, :n] = self.emb[c][order], self.score[c][order]
            box[c, :n], mask[c, :n] = self.box[c][order], True
        return SlideBag(
            center,
            batch,
            slide_id,
            emb,
            score,
            box,
            mask,
            n_tiles=self.n_tiles,
            tiles_read=self.read,
            n_squamous=self.squamous,
            errors=self.errors,
        )


def collect_bags(
    batches: Iterable[dict[str, np.ndarray]],
    top_k: int,
    dim: int,
    expected: Iterable[tuple[str, str, str]] = (),
    total_tiles: int | None = None,
) -> dict[tuple[str, str, str], SlideBag]:
    """Fold cell and tile rows into one bag per slide; ``expected`` slides never seen are
    reported as errors rather than silently missing."""
    acc: dict[tuple[str, str, str], _Acc] = {}
    with tqdm(desc="screening tiles", unit="tile", total=total_tiles, disable=None) as bar:
        for b in batches:
            keys = list(
                zip(b["center"].tolist(), b["batch"].tolist(), b["slide_id"].tolist(), strict=True)
            )
            cls = b["class_index"]
            for key in dict.fromkeys(keys):
                if key not in acc:
                    acc[key] = _Acc(top_k, dim)
            tile = np.flatnonzero(cls == TILE_ROW)
            for i in tile:
                a = acc[keys[i]]
                if b["status"][i] == STATUS_OK:
                    a.read += 1
                    a.squamous += int(b["n_squamous"][i])
                else:
                    a.errors.append(str(b["error"][i]))
                if b["tile_index"][i] != NO_TILE:
                    a.n_tiles = int(b["n_tiles"][i])
            bar.update(len(tile))
            cells = np.flatnonzero(cls != TILE_ROW)
            if len(cells):
                groups: dict[tuple[tuple[str, str, str], int], list[int]] = {}
                for i in cells:
                    groups.setdefault((keys[i], int(cls[i])), []).append(i)
                for (key, c), idx in groups.items():
                    acc[key].add(c, b["embedding"][idx], b["score"][idx], b["box"][idx])
    for key in expected:
        if key not in acc:
            acc[key] = _Acc(top_k, dim)
            acc[key].errors.append("no tile of this slide reached the screening stage")
    return {key: a.bag(*key) for key, a in acc.items()}
