"""Write an :class:`~smartccs.evaluation.report.Evaluation` as a report folder.

::

    out/report.md            the report in Markdown
    out/report.html          the same, self-contained HTML (tables, no JS) linking the PNGs
    out/metrics.json         the Evaluation, as pydantic dumps it (NaN as null)
    out/roc.png              one ROC per center plus overall, AUC and operating point
    out/confusion.png        7 x 7 grade confusion per group
    out/slides/<center>/<batch>/<slide_id>-heatmap.png   abnormal-cell density on a thumbnail
    out/slides/<center>/<batch>/<slide_id>-cells.png     the top kept cells per class

Per-slide figures open each slide, so they are made for at most ``max_slides`` slides: every
truth-positive slide first, then the highest scores, both by descending score (failed slides
have no score and no cells, so none is drawn).
"""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict
from tqdm.auto import tqdm

from smartccs.errors import CCSError
from smartccs.evaluation.figures import cell_gallery, confusion_figure, roc_figure, slide_heatmap
from smartccs.evaluation.report import DETECTION_NOTE, NEGATIVE_GRADE, Evaluation, GroupResult
from smartccs.slide.reader import Slide
from smartccs.taxonomy import ABNORMAL_CLASSES

log = logging.getLogger(__name__)

__all__ = ["ReportFiles", "SlideFigure", "choose_slides", "write_report"]

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


class ReportFiles(BaseModel):
    """What :func:`write_report` wrote."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    out_dir: Path
    markdown: Path
    html: Path
    metrics: Path
    roc: Path
    confusion: Path
    slides: list[SlideFigure]


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


# --- a tiny document model, rendered to Markdown and HTML ----------------------------------


@dataclass(frozen=True)
class _Link:
    text: str
    href: str


Cell = str | _Link


@dataclass(frozen=True)
class _Block:
    kind: str  # h1 h2 p ul table img
    text: str = ""
    items: Sequence[str] = ()
    header: Sequence[str] = ()
    rows: Sequence[Sequence[Cell]] = ()


def _md_cell(c: Cell) -> str:
    if isinstance(c, _Link):
        return f"[{c.text}]({c.href})"
    return c.replace("|", "\\|").replace("\n", " ")


def _markdown(blocks: list[_Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if b.kind == "h1":
            out.append(f"# {b.text}")
        elif b.kind == "h2":
            out.append(f"## {b.text}")
        elif b.kind == "p":
            out.append(b.text)
        elif b.kind == "ul":
            out.append("\n".join(f"- {i}" for i in b.items))
        elif b.kind == "img":
            out.append(f"![{b.items[0] if b.items else ''}]({b.text})")
        elif b.kind == "table":
            lines = ["| " + " | ".join(_md_cell(h) for h in b.header) + " |"]
            lines.append("|" + "|".join(" --- " for _ in b.header) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def _html_cell(c: Cell) -> str:
    if isinstance(c, _Link):
        return f'<a href="{html.escape(c.href)}">{html.escape(c.text)}</a>'
    return html.escape(c)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 80em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f2f2f2; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; }
"""


def _html(blocks: list[_Block], title: str) -> str:
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
    ]
    for b in blocks:
        if b.kind in ("h1", "h2", "p"):
            out.append(f"<{b.kind}>{html.escape(b.text)}</{b.kind}>")
        elif b.kind == "ul":
            out.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in b.items) + "</ul>")
        elif b.kind == "img":
            alt = html.escape(b.items[0] if b.items else "")
            out.append(f'<p><img src="{html.escape(b.text)}" alt="{alt}"></p>')
        elif b.kind == "table":
            out.append("<table><thead><tr>")
            out.append("".join(f"<th>{html.escape(h)}</th>" for h in b.header))
            out.append("</tr></thead><tbody>")
            for row in b.rows:
                out.append("<tr>" + "".join(f"<td>{_html_cell(c)}</td>" for c in row) + "</tr>")
            out.append("</tbody></table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# --- content --------------------------------------------------------------------------------


def _f(v: float | None, digits: int = 3) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _screening_row(g: GroupResult) -> list[Cell]:
    b = g.binary
    auc = f"{b.auc:.3f} ({b.auc_ci_low:.3f}-{b.auc_ci_high:.3f})" if b is not None else "—"
    return [
        g.name,
        str(g.n_slides),
        str(g.n_positive),
        str(g.n_scored),
        f"{g.n_inadequate} ({g.n_inadequate_positive})",
        f"{g.n_failed} ({g.n_failed_positive})",
        str(g.n_without_truth),
        str(g.n_not_in_results),
        auc,
        _f(b.sensitivity) if b else "—",
        _f(b.specificity) if b else "—",
        g.binary_reason or "",
    ]


def _detection_rows(ev: Evaluation) -> list[list[Cell]]:
    rows: list[list[Cell]] = []
    for g in ev.groups:
        d = g.detection
        if d is None:
            rows.append(
                [g.name, "0", *["—"] * len(ABNORMAL_CLASSES), "—", g.detection_reason or ""]
            )
            continue
        r = d.report
        aps = [f"{_f(r.ap[c])} ({r.n_pred[c]}/{r.n_gt[c]})" for c in ABNORMAL_CLASSES]
        rows.append([g.name, str(d.n_slides), *aps, _f(r.map), ""])
    return rows


def _blocks(ev: Evaluation, figures: list[SlideFigure], n_candidates: int) -> list[_Block]:
    m = ev.model
    level = round((1 - ev.config.alpha) * 100)
    b: list[_Block] = [_Block("h1", "Smart-CCS screening evaluation")]
    b.append(
        _Block(
            "p",
            f"Results: {ev.results_uri or 'in-memory tables'}; ground truth: "
            f"{ev.truth_source or 'given table'}; batches: {', '.join(ev.partitions) or 'none'}; "
            f"screening runs: {', '.join(ev.run_ids) or 'none'}. Generated {ev.created_at}.",
        )
    )
    b.append(
        _Block(
            "p",
            f"Models: classifier {m.classifier or '—'}, detector {m.detector or '—'}, "
            f"encoder {m.encoder or '—'}; operating threshold {_f(m.threshold, 4)} (stored with "
            f"the model). AUC CI: {level}% stratified bootstrap, {ev.config.n_boot} resamples, "
            f"seed {ev.config.seed}.",
        )
    )
    b.append(_Block("h2", "Slide-level screening (abnormal vs NILM)"))
    b.append(
        _Block(
            "table",
            header=[
                "group",
                "slides",
                "abnormal",
                "scored",
                "inadequate (abn.)",
                "failed (abn.)",
                "no truth",
                "not in results",
                f"AUC ({level}% CI)",
                "sensitivity",
                "specificity",
                "note",
            ],
            rows=[_screening_row(g) for g in ev.groups],
        )
    )
    b.append(_Block("img", "roc.png", items=["ROC curves"]))
    b.append(_Block("h2", "Slide grades"))
    b.append(_Block("p", "Scored slides by true grade (rows) and predicted grade (columns)."))
    b.append(_Block("img", "confusion.png", items=["grade confusion matrices"]))
    o = ev.overall.confusion
    b.append(
        _Block(
            "table",
            header=["true \\ predicted", *o.labels],
            rows=[
                [lab, *(str(v) for v in row)] for lab, row in zip(o.labels, o.counts, strict=True)
            ],
        )
    )
    b.append(_Block("h2", f"Cell detection (AP at IoU {ev.config.iou:g})"))
    b.append(_Block("p", DETECTION_NOTE + " Each cell: AP (kept cells / annotated cells)."))
    b.append(
        _Block(
            "table",
            header=["group", "annotated slides", *ABNORMAL_CLASSES, "mAP", "note"],
            rows=_detection_rows(ev),
        )
    )
    b.append(_Block("h2", "Slides"))
    b.append(
        _Block(
            "p",
            f"Figures for {len(figures)} of {n_candidates} scored slides: every abnormal slide "
            "(by truth) first, then the highest scores. Heatmap: score-weighted density of the "
            "kept abnormal cells on a thumbnail; cells: the top kept cells of each class.",
        )
    )
    rows: list[list[Cell]] = []
    for f in figures:
        rows.append(
            [
                f.center,
                f.batch,
                f.slide_id,
                f.truth or "—",
                f.status,
                _f(f.score),
                f.predicted_grade or "—",
                str(f.n_cells),
                _Link("heatmap", f.heatmap) if f.heatmap else (f.error or "—"),
                _Link("cells", f.cells) if f.cells else "—",
            ]
        )
    b.append(
        _Block(
            "table",
            header=[
                "center",
                "batch",
                "slide",
                "truth",
                "status",
                "score",
                "predicted",
                "kept cells",
                "heatmap",
                "cells",
            ],
            rows=rows,
        )
    )
    b.append(_Block("h2", "Rules"))
    b.append(_Block("ul", items=ev.rules))
    return b


# --- per-slide figures ------------------------------------------------------------------------


def _slide_figures(
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
    figures: list[SlideFigure] = []
    for i in tqdm(chosen, desc="slide figures", unit="slide", disable=not progress):
        r = rows[i]
        c, b, s = r["center"], r["batch"], r["slide_id"]
        if keys is not None and cells is not None:
            slide_cells = cells.filter(pc.equal(keys, f"{c}/{b}/{s}"))
        else:
            slide_cells = pa.table(
                {
                    "cell_class": pa.array([], pa.string()),
                    "score": pa.array([], pa.float32()),
                    **{k: pa.array([], pa.float64()) for k in ("x0", "y0", "x1", "y1")},
                }
            )
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
                title = f"{c}/{b}/{s}: truth {r['truth'] or '—'}, score {_f(r['score'])}"
                slide_heatmap(
                    slide, slide_cells, out_dir / f"{rel}-heatmap.png", mpp=heatmap_mpp, title=title
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


def write_report(
    evaluation: Evaluation,
    out_dir: str | Path,
    *,
    outcomes: pa.Table | None = None,
    cells: pa.Table | None = None,
    open_slide: SlideOpener | None = None,
    max_slides: int = 50,
    heatmap_mpp: float = 12.0,
    per_class: int = 8,
    crop_um: float = 56.0,
    progress: bool = True,
) -> ReportFiles:
    """Write ``report.md``, ``report.html``, ``metrics.json``, ``roc.png``, ``confusion.png``
    and, given ``outcomes`` (``slide_outcomes``), the ``cells`` table and ``open_slide``,
    a heatmap and a cell gallery for up to ``max_slides`` slides (see :func:`choose_slides`).

    A slide that cannot be opened or read gets its error in the slide list instead of figures;
    the report is still written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.json"
    metrics.write_text(evaluation.model_dump_json(indent=2) + "\n")
    curves = {g.name: g.roc for g in evaluation.groups if g.roc is not None}
    roc = roc_figure(curves, out / "roc.png")
    confusion = confusion_figure(
        {g.name: g.confusion for g in evaluation.groups}, out / "confusion.png"
    )
    figures: list[SlideFigure] = []
    n_candidates = 0
    if outcomes is not None:
        score = outcomes["score"].to_numpy(zero_copy_only=False)
        n_candidates = int(np.isfinite(score.astype(np.float64)).sum()) if len(score) else 0
        figures = _slide_figures(
            outcomes,
            cells,
            open_slide,
            out,
            max_slides,
            heatmap_mpp,
            per_class,
            crop_um,
            progress,
        )
    blocks = _blocks(evaluation, figures, n_candidates)
    md = out / "report.md"
    md.write_text(_markdown(blocks))
    page = out / "report.html"
    page.write_text(_html(blocks, "Smart-CCS screening evaluation"))
    return ReportFiles(
        out_dir=out,
        markdown=md,
        html=page,
        metrics=metrics,
        roc=roc,
        confusion=confusion,
        slides=figures,
    )
