"""The report's per-slide figures: which slides get one, a heatmap and a cell gallery each,
all heatmaps on one colour scale."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict
from tqdm.auto import tqdm

from smartccs.errors import CCSError
from smartccs.evaluation.figures import cell_gallery, heatmap_density, slide_heatmap
from smartccs.evaluation.report import NEGATIVE_GRADE
from smartccs.slide.reader import Slide

log = logging.getLogger(__name__)

__all__ = ["SlideFigure", "SlideOpener", "choose_slides", "slide_figures"]

SlideOpener = Callable[[str, str, str], Slide]
"""``(center, batch, slide_id) -> Slide``; the report closes what it opens."""


class SlideFigure(BaseModel):
    """One slide of the report's slide list, with its figures' paths relative to the report."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    center: str
    batch: str
    slide_id: str
    truth: str | None
    status: str
    score: float | None
    predicted_grade: str | None
    n_cells: int
    heatmap: str | None = None
    cells: str | None = None
    error: str | None = None


def choose_slides(outcomes: pa.Table, max_slides: int) -> list[int]:
    """Row indexes of ``outcomes`` (``slide_outcomes``) to draw: scored slides only, every
    truth-positive one first, then the rest, each part by descending score; at most
    ``max_slides``."""
    if max_slides <= 0 or outcomes.num_rows == 0:
        return []
    truth = outcomes["truth"].to_pylist()
    score = outcomes["score"].to_pylist()
    rows = [i for i, s in enumerate(score) if s is not None and math.isfinite(s)]
    positive = [i for i in rows if truth[i] not in (None, NEGATIVE_GRADE)]
    rest = [i for i in rows if truth[i] in (None, NEGATIVE_GRADE)]

    def by_score(idx: list[int]) -> list[int]:
        return sorted(idx, key=lambda i: (-score[i], i))

    return (by_score(positive) + by_score(rest))[:max_slides]


def slide_figures(
    outcomes: pa.Table,
    cells: pa.Table | None,
    open_slide: SlideOpener | None,
    out_dir: Path,
    max_slides: int,
    heatmap_mpp: float,
    per_class: int,
    crop_um: float,
    progress: bool,
) -> list[SlideFigure]:
    chosen = choose_slides(outcomes, max_slides)
    rows = outcomes.to_pylist()
    keys = None
    if cells is not None and cells.num_rows:
        keys = pc.binary_join_element_wise(
            cells["center"].cast(pa.string()),
            cells["batch"].cast(pa.string()),
            cells["slide_id"].cast(pa.string()),
            "/",
        )

    def cells_of(c: str, b: str, s: str) -> pa.Table:
        if keys is not None and cells is not None:
            return cells.filter(pc.equal(keys, f"{c}/{b}/{s}"))
        return pa.table(
            {
                "cell_class": pa.array([], pa.string()),
                "score": pa.array([], pa.float32()),
                **{k: pa.array([], pa.float64()) for k in ("x0", "y0", "x1", "y1")},
            }
        )

    keyed = [(rows[i], (rows[i]["center"], rows[i]["batch"], rows[i]["slide_id"])) for i in chosen]
    vmax = _common_scale(keyed, cells_of, open_slide, heatmap_mpp)
    note = f"one scale for all {len(chosen)} slides of this report"
    figures: list[SlideFigure] = []
    for r, (c, b, s) in tqdm(keyed, desc="slide figures", unit="slide", disable=not progress):
        slide_cells = cells_of(c, b, s)
        base = dict(
            center=c,
            batch=b,
            slide_id=s,
            truth=r["truth"],
            status=r["status"],
            score=r["score"],
            predicted_grade=r["predicted_grade"],
            n_cells=slide_cells.num_rows,
        )
        if open_slide is None:
            figures.append(SlideFigure(**base, error="no slide access"))
            continue
        rel = f"slides/{c}/{b}/{s}"
        try:
            with open_slide(c, b, s) as slide:
                score = "—" if r["score"] is None else f"{r['score']:.3f}"
                title = f"{c}/{b}/{s}: truth {r['truth'] or '—'}, score {score}"
                slide_heatmap(
                    slide,
                    slide_cells,
                    out_dir / f"{rel}-heatmap.png",
                    mpp=heatmap_mpp,
                    title=title,
                    vmax=vmax,
                    scale_note=note,
                )
                cell_gallery(
                    slide,
                    slide_cells,
                    out_dir / f"{rel}-cells.png",
                    per_class=per_class,
                    crop_um=crop_um,
                )
        except CCSError as exc:
            log.warning("no figures for %s/%s/%s: %s", c, b, s, exc)
            figures.append(SlideFigure(**base, error=str(exc).splitlines()[0]))
            continue
        figures.append(SlideFigure(**base, heatmap=f"{rel}-heatmap.png", cells=f"{rel}-cells.png"))
    return figures


def _common_scale(
    keyed: list[tuple[dict, tuple[str, str, str]]],
    cells_of: Callable[[str, str, str], pa.Table],
    open_slide: SlideOpener | None,
    heatmap_mpp: float,
) -> float | None:
    """The densest spot over every slide the report draws: the top of one colour scale, so
    heatmaps compare at a glance (a slide's own peak would make a NILM slide as hot as HSIL).
    Only the slides' sizes are read here, not their pixels."""
    if open_slide is None:
        return None
    peak = 0.0
    for _, (c, b, s) in keyed:
        with contextlib.suppress(CCSError), open_slide(c, b, s) as slide:
            density, _ = heatmap_density(slide, cells_of(c, b, s), heatmap_mpp)
            peak = max(peak, float(density.max()) if density.size else 0.0)
    return peak or None
