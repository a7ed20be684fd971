"""Which batches a training run learns from, and whether its splits fill: checked up front.

A detector learns from cell annotations (``labels/<center>/<batch>/cells.parquet``), a
classifier from the slide grades in the manifests. ``batches: []`` means every committed batch
that has them: the others are skipped, and the log names each with the reason. A batch named
explicitly must have them. Both checks read manifests and label markers only, so the jobs run
them before Ray starts (``smartccs.jobrunner``, ``check``), as do the library calls.

An empty split is refused with one line that says how many slides each split would get and
which fraction to set: slides are split per center x normal/abnormal stratum, ``round(n x
fraction)`` of each (``smartccs.splits``), so a cohort of many small strata can leave a split
empty at fractions that look generous.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence

from smartccs import layout
from smartccs.batches import BatchRef, list_batches, load_batch, resolve_batches
from smartccs.errors import CCSError
from smartccs.ids import batch_key
from smartccs.labels import CELLS_FILE, LabelsError, has_cell_labels
from smartccs.splits import Split, SplitConfig
from smartccs.store import Store

log = logging.getLogger(__name__)

SPLITS: tuple[Split, ...] = ("train", "val", "test")
_GRID = [round(0.05 * i, 2) for i in range(20)]
"""Fractions tried for a suggestion: 0 to 0.95 in steps of 0.05."""
_LISTED = 10


def batch_ids(refs: Iterable[BatchRef]) -> list[str]:
    return [batch_key(r.center, r.batch) for r in refs]


def _names(ids: Sequence[str]) -> str:
    more = len(ids) - _LISTED
    return ", ".join(ids[:_LISTED]) + (f" and {more} more" if more > 0 else "")


def _skipped(what: str, kept: int, skipped: dict[str, str]) -> None:
    if not skipped:
        return
    reasons = Counter(skipped.values())
    log.warning(
        "%s: using %d committed batch(es); skipped %d: %s",
        what,
        kept,
        len(skipped),
        "; ".join(
            f"{_names([b for b, r in skipped.items() if r == reason])} ({reason})"
            for reason in reasons
        ),
    )


def labelled_batches(
    store: Store, names: Sequence[str], exclude: Iterable[str] = ()
) -> list[BatchRef]:
    """The batches a detector learns from: ``names`` (each must have cell annotations), or
    with none named every committed batch that has them, less ``exclude`` (held-out ones)."""
    if names:
        refs = resolve_batches(store, list(names))
        missing = [r for r in refs if not has_cell_labels(store, r.center, r.batch)]
        if missing:
            first = store.uri(layout.labels(missing[0].center, missing[0].batch), CELLS_FILE)
            raise LabelsError(
                f"{_names(batch_ids(missing))}: no cell annotations (none at {first}); publish "
                "them (`ccs labels CELLS.parquet --center C --batch B`) or leave the batch out"
            )
        return refs
    held = set(exclude)
    pairs = [(c, b) for c, b in list_batches(store) if f"{c}/{b}" not in held]
    if not pairs:
        raise CCSError(f"no committed batches to train on in {store.uri('incoming')}")
    kept = [(c, b) for c, b in pairs if has_cell_labels(store, c, b)]
    skipped = {f"{c}/{b}": "no cell annotations" for c, b in pairs if (c, b) not in kept}
    if not kept:
        raise LabelsError(
            f"none of the {len(pairs)} committed batches in {store.uri('incoming')} has cell "
            f"annotations ({store.uri('labels', '<center>', '<batch>', CELLS_FILE)}); publish "
            "them with `ccs labels CELLS.parquet --center C --batch B`"
        )
    _skipped("detector", len(kept), skipped)
    return [load_batch(store, c, b) for c, b in kept]


def _ungraded(ref: BatchRef) -> str | None:
    missing = [s.slide_id for s in ref.manifest.slides if s.grade is None]
    if not missing:
        return None
    return f"{len(missing)} of {len(ref.manifest.slides)} slides without a grade"


def graded_batches(store: Store, names: Sequence[str]) -> list[BatchRef]:
    """The batches a classifier learns from: ``names`` (every slide graded in the manifest), or
    with none named every committed batch whose slides all have a grade."""
    refs = resolve_batches(store, list(names))
    why = {batch_key(r.center, r.batch): _ungraded(r) for r in refs}
    if names:
        bad = {b: w for b, w in why.items() if w}
        if bad:
            first = next(iter(bad))
            raise CCSError(
                f"{_names(list(bad))}: the classifier learns from slide grades, and {first} has "
                f"{bad[first]} in its manifest; leave such batches out"
            )
        return refs
    kept = [r for r in refs if not why[batch_key(r.center, r.batch)]]
    skipped = {b: w for b, w in why.items() if w}
    if not kept:
        raise CCSError(
            f"none of the {len(refs)} committed batches in {store.uri('incoming')} has a grade "
            "for every slide in its manifest: the classifier learns from slide grades"
        )
    _skipped("classifier", len(kept), skipped)
    return kept


def _strata(refs: Iterable[BatchRef]) -> Counter[int]:
    """How many strata (center x normal/abnormal, as ``smartccs.splits``) have each size."""
    sizes: Counter[tuple[str, bool]] = Counter(
        (r.center, (s.grade or "NILM") != "NILM") for r in refs for s in r.manifest.slides
    )
    return Counter(sizes.values())


def split_counts(strata: Counter[int], val: float, test: float) -> dict[Split, int]:
    """Slides per split for strata of these sizes, as ``smartccs.splits.assign_splits`` cuts
    them: the first ``round(n x test)`` of a stratum to test, the next ``round(n x val)`` to
    validation, the rest to training."""
    out = dict.fromkeys(SPLITS, 0)
    for n, times in strata.items():
        n_test = min(round(n * test), n)
        n_val = min(round(n * val), n - n_test)
        out["test"] += n_test * times
        out["val"] += n_val * times
        out["train"] += (n - n_test - n_val) * times
    return out


def _shown(counts: dict[Split, int]) -> str:
    return ", ".join(f"{k} {counts[k]}" for k in SPLITS)


def _suggestion(strata: Counter[int], cfg: SplitConfig, needed: Sequence[Split]) -> str | None:
    best = None
    for val in _GRID:
        for test in _GRID:
            if val + test >= 1:
                continue
            counts = split_counts(strata, val, test)
            if not all(counts[s] for s in needed):
                continue
            changed = [(k, v) for k, v, now in (("val", val, cfg.val), ("test", test, cfg.test))
                       if abs(v - now) > 1e-9]  # fmt: skip
            cost = (len(changed), abs(val - cfg.val) + abs(test - cfg.test))
            if best is None or cost < best[0]:
                best = (cost, changed, counts)
    if best is None:
        return None
    _, changed, counts = best
    return " and ".join(f"split.{k} to {v:g}" for k, v in changed) + f" ({_shown(counts)})"


def check_splits(
    refs: Sequence[BatchRef], cfg: SplitConfig, needed: Sequence[Split], what: str
) -> dict[Split, int]:
    """Slides per split; a ``CCSError`` saying what to change when a needed split is empty."""
    strata = _strata(refs)
    counts = split_counts(strata, cfg.val, cfg.test)
    empty = [s for s in needed if not counts[s]]
    if not empty:
        return counts
    n = sum(size * times for size, times in strata.items())
    sizes = sorted(strata)
    span = f"{sizes[0]}" if sizes[0] == sizes[-1] else f"{sizes[0]}-{sizes[-1]}"
    head = (
        f"{what}: the {' and '.join(empty)} split would be empty: {n} slides of "
        f"{len(refs)} batch(es) split {_shown(counts)} (split.val {cfg.val:g}, split.test "
        f"{cfg.test:g} of each center x normal/abnormal stratum, rounded; "
        f"{sum(strata.values())} strata of {span} slides)"
    )
    fix = _suggestion(strata, cfg, needed)
    if fix is None:
        raise CCSError(f"{head}; no split fractions fill {', '.join(needed)}: add slides")
    raise CCSError(f"{head}; set {fix}, or add slides")
