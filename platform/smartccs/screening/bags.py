"""Per slide, the top-K cells of each abnormal class: the bag the MIL head reads.

Cell rows stream out of the ``CellScorer`` pool in any order across tiles; this keeps, per slide
and class, only the K best so far (memory: slides in flight x 6 x K embeddings, whatever the
slide size), and counts tiles, failed tiles, squamous nuclei (``screening.adequacy``) and QC
for the slide row.

A tile's cells always arrive just before its summary row (``class_index = TILE_ROW``), so cells
wait for that row before they count: a tile delivered twice (a retried task after a worker was
killed) is recognised by its index and counted once. A slide is complete the moment all of its
planned tiles have been seen, so a long cohort run can publish each batch as soon as its last
slide completes. A slide whose every row is an error becomes a bag with its reason, no cells.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from smartccs.data.tiles import NO_TILE, STATUS_OK
from smartccs.ids import SlideKey
from smartccs.logs import Progress
from smartccs.results.schema import STATUS_REJECTED
from smartccs.screening.cell_rows import (
    AUG_EMBEDDING,
    BACKGROUND,
    BATCH,
    BLUR,
    BOX,
    CENTER,
    CLASS_INDEX,
    EMBEDDING,
    ERROR,
    N_SQUAMOUS,
    N_TILES,
    SCORE,
    SECONDS,
    SLIDE_AREA,
    SLIDE_ID,
    SLIDE_MPP,
    STATUS,
    TILE_INDEX,
    TILE_ROW,
)  # fmt: skip
from smartccs.taxonomy import ABNORMAL_CLASSES

N_CLASSES = len(ABNORMAL_CLASSES)

log = logging.getLogger(__name__)

TILES_LOG_EVERY_S = 30.0
"""How often a line on the tiles scored so far is logged: a 20 mm slide is 16,000 tiles, minutes
of work before its one "slide screened" line, and a job's log shows no progress bar."""


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
    tiles_failed: int = 0
    slide_mpp: float = float("nan")
    slide_area_mm2: float = float("nan")  # the scanned glass: adequacy pro-rates its minimum
    background_fraction: float = float("nan")
    blur: float = float("nan")
    seconds: float = float("nan")  # worker compute spent on the slide (read, detect, embed)
    aug_embeddings: np.ndarray | None = None  # (6, K, D): the same cells' augmented view (TTA)
    rejected: bool = False  # not a cytology preparation (slide.specimen): ``error`` says why

    @property
    def key(self) -> SlideKey:
        return (self.center, self.batch, self.slide_id)

    @property
    def ok(self) -> bool:
        return self.tiles_read > 0

    @property
    def error(self) -> str:
        return self.errors[0] if self.errors else ""


class _SlideInProgress:
    """One slide whose tiles are still arriving: its best cells per class so far, its tile
    counts and QC sums, and the cells of tiles whose summary row has not come yet."""

    def __init__(self, k: int, dim: int, views: int = 1):
        self.k, self.dim = k, dim
        self.emb = [np.zeros((0, views * dim), np.float32) for _ in range(N_CLASSES)]
        self.score = [np.zeros(0, np.float32) for _ in range(N_CLASSES)]
        self.box = [np.zeros((0, 4), np.float64) for _ in range(N_CLASSES)]
        self.n_tiles = self.read = self.failed = self.squamous = 0
        self.planned = False  # n_tiles is known (a tile row, or the slide's error row, arrived)
        self.seen: set[int] = set()
        self.pending: dict[int, list[tuple[int, np.ndarray, float, np.ndarray]]] = {}
        self.bg_sum = self.blur_sum = 0.0
        self.qc_n = 0
        self.mpp = self.area_mm2 = float("nan")
        self.seconds = 0.0
        self.errors: list[str] = []
        self.rejected = False  # the planner found no cytology preparation on the glass

    @property
    def complete(self) -> bool:
        return self.planned and len(self.seen) >= self.n_tiles

    def add(self, c: int, emb: np.ndarray, score: np.ndarray, box: np.ndarray) -> None:
        e = np.concatenate([self.emb[c], emb])
        s = np.concatenate([self.score[c], score])
        b = np.concatenate([self.box[c], box])
        if len(s) > self.k:
            top = np.argpartition(-s, self.k - 1)[: self.k]
            e, s, b = e[top], s[top], b[top]
        self.emb[c], self.score[c], self.box[c] = e, s, b

    def tile(self, b: dict[str, np.ndarray], i: int) -> int:
        """Fold one summary row in; returns 1 if it was a new tile, 0 for a repeat."""
        index = int(b[TILE_INDEX][i])
        if index == NO_TILE:  # the slide could not be planned: its only row
            self.planned = True
            self.rejected = str(b[STATUS][i]) == STATUS_REJECTED
            self.errors.append(str(b[ERROR][i]))
            return 1
        cells = self.pending.pop(index, [])
        if index in self.seen:
            return 0
        self.seen.add(index)
        self.n_tiles, self.planned = int(b[N_TILES][i]), True
        if SLIDE_MPP in b:
            self.mpp = float(b[SLIDE_MPP][i])
        if SLIDE_AREA in b:
            self.area_mm2 = float(b[SLIDE_AREA][i])
        if SECONDS in b and np.isfinite(b[SECONDS][i]):
            self.seconds += float(b[SECONDS][i])
        if b[STATUS][i] == STATUS_OK:
            self.read += 1
            self.squamous += int(b[N_SQUAMOUS][i])
            if BACKGROUND in b and np.isfinite(b[BACKGROUND][i]):
                self.bg_sum += float(b[BACKGROUND][i])
                self.blur_sum += float(b[BLUR][i])
                self.qc_n += 1
            for c, emb, score, box in cells:
                self.add(c, emb[None], np.array([score], np.float32), box[None])
        else:
            self.failed += 1
            self.errors.append(str(b[ERROR][i]))
        return 1

    def bag(self, key: SlideKey) -> SlideBag:
        k = self.k
        emb = np.zeros((N_CLASSES, k, self.emb[0].shape[1]), np.float32)
        score = np.zeros((N_CLASSES, k), np.float32)
        box = np.full((N_CLASSES, k, 4), np.nan)
        mask = np.zeros((N_CLASSES, k), bool)
        for c in range(N_CLASSES):
            order = np.argsort(-self.score[c], kind="stable")
            n = len(order)
            emb[c, :n], score[c, :n] = self.emb[c][order], self.score[c][order]
            box[c, :n], mask[c, :n] = self.box[c][order], True
        errors = list(self.errors)
        missing = self.n_tiles - len(self.seen) if self.planned else 0
        if missing > 0:
            errors.append(f"{missing} of {self.n_tiles} tiles never reached the screening stage")
        if not self.planned:
            errors.append("no tile of this slide reached the screening stage")
        if self.read == 0 and self.n_tiles and not errors:
            errors.append("no tile of this slide could be read")
        return SlideBag(
            *key,
            emb[..., : self.dim],
            score,
            box,
            mask,
            n_tiles=self.n_tiles,
            tiles_read=self.read,
            n_squamous=self.squamous,
            errors=errors,
            tiles_failed=self.failed + max(missing, 0),
            slide_mpp=self.mpp,
            slide_area_mm2=self.area_mm2,
            background_fraction=self.bg_sum / self.qc_n if self.qc_n else float("nan"),
            blur=self.blur_sum / self.qc_n if self.qc_n else float("nan"),
            seconds=self.seconds,
            aug_embeddings=emb[..., self.dim :] if emb.shape[-1] > self.dim else None,
            rejected=self.rejected,
        )


class BagCollector:
    """Folds scorer output batches into bags, handing back each slide as soon as it completes."""

    def __init__(self, top_k: int, dim: int, views: int = 1):
        self.top_k, self.dim, self.views = top_k, dim, views
        self._acc: dict[SlideKey, _SlideInProgress] = {}
        self._done: set[SlideKey] = set()

    def _get(self, key: SlideKey) -> _SlideInProgress:
        acc = self._acc.get(key)
        if acc is None:
            acc = self._acc[key] = _SlideInProgress(self.top_k, self.dim, self.views)
        return acc

    def add(self, b: dict[str, np.ndarray]) -> tuple[list[SlideBag], int]:
        """Fold one batch in; returns the slides it completed and how many new tiles it held."""
        keys = list(zip(b[CENTER].tolist(), b[BATCH].tolist(), b[SLIDE_ID].tolist(), strict=True))
        cls = b[CLASS_INDEX]
        new_tiles = 0
        touched: dict[SlideKey, None] = {}
        for i, key in enumerate(keys):
            if key in self._done:
                continue  # a repeat of a tile of a slide already handed back
            acc = self._get(key)
            c = int(cls[i])
            if c == TILE_ROW:
                new_tiles += acc.tile(b, i)
                touched[key] = None
            elif int(b[TILE_INDEX][i]) not in acc.seen:
                emb = b[EMBEDDING][i]
                if self.views > 1:  # the augmented view rides along, cell by cell
                    emb = np.concatenate([emb, b[AUG_EMBEDDING][i]])
                acc.pending.setdefault(int(b[TILE_INDEX][i]), []).append(
                    (c, emb, float(b[SCORE][i]), b[BOX][i])
                )
        done = [key for key in touched if self._acc[key].complete]
        return [self._pop(key) for key in done], new_tiles

    def _pop(self, key: SlideKey) -> SlideBag:
        self._done.add(key)
        return self._acc.pop(key).bag(key)

    def finish(self, expected: Iterable[SlideKey] = ()) -> list[SlideBag]:
        """Every slide not yet handed back, incomplete ones with the reason; ``expected`` slides
        never seen are reported as errors rather than silently missing."""
        for key in expected:
            if key not in self._done:
                self._get(key)
        return [self._pop(key) for key in list(self._acc)]


def iter_bags(
    batches: Iterable[dict[str, np.ndarray]],
    top_k: int,
    dim: int,
    expected: Iterable[SlideKey] = (),
    total_tiles: int | None = None,
    views: int = 1,
) -> Iterator[SlideBag]:
    """Bags in the order slides complete, then the incomplete and missing ones; a log line
    on the tiles scored every ``TILES_LOG_EVERY_S``."""
    collector = BagCollector(top_k, dim, views)
    progress, scored = Progress(total_tiles, seconds=TILES_LOG_EVERY_S), 0
    with tqdm(desc="screening tiles", unit="tile", total=total_tiles, disable=None) as bar:
        for b in batches:
            done, tiles = collector.add(b)
            bar.update(tiles)
            scored += tiles
            if progress.due(scored):  # the pace from the first scored tiles, not start-up
                log.info("%d tiles scored, %.1f tiles/s", scored, progress.rate(scored))
            yield from done
    yield from collector.finish(expected)


def collect_bags(
    batches: Iterable[dict[str, np.ndarray]],
    top_k: int,
    dim: int,
    expected: Iterable[SlideKey] = (),
    total_tiles: int | None = None,
) -> dict[SlideKey, SlideBag]:
    """Every slide's bag, once the stream has ended."""
    return {b.key: b for b in iter_bags(batches, top_k, dim, expected, total_tiles)}
