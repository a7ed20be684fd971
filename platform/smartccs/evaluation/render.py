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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from smartccs.evaluation.figures import confusion_figure, roc_figure
from smartccs.evaluation.report import (
    DETECTION_NOTE,
    Evaluation,
    GroupResult,
    ModelInfo,
    threshold_text,
)
from smartccs.evaluation.slide_figures import SlideFigure, SlideOpener, choose_slides, slide_figures
from smartccs.metrics.classification import BinaryReport
from smartccs.taxonomy import ABNORMAL_CLASSES

log = logging.getLogger(__name__)

__all__ = ["ReportFiles", "SlideFigure", "choose_slides", "write_report"]


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


def _rate(b: BinaryReport | None, which: str) -> str:
    """``0.917 (0.646-0.985)``: a sensitivity or specificity with its CI."""
    if b is None:
        return "—"
    v, low, high = (getattr(b, f"{which}{end}") for end in ("", "_ci_low", "_ci_high"))
    return f"{v:.3f} ({low:.3f}-{high:.3f})"


def _specificity_at(b: BinaryReport | None, targets: Sequence[float]) -> list[Cell]:
    at = {x.sensitivity: x.specificity for x in b.specificity_at} if b else {}
    return [_f(at.get(t)) for t in targets]


def _operating_point(m: ModelInfo) -> str:
    op = m.operating_point
    if op is None:
        return "The model's card does not say how its threshold was chosen."
    return f"Operating point: {op.describe()}." + (f" Not resolved: {op.note}." if op.note else "")


def _group_threshold(b: BinaryReport | None) -> str:
    """The threshold(s) a group's slides were called at: one value, or their range."""
    if b is None:
        return "—"
    if b.threshold is not None or b.threshold_min is None or b.threshold_max is None:
        return _f(b.threshold, 4)
    return f"{b.threshold_min:.4f}–{b.threshold_max:.4f}"


def _screening_row(g: GroupResult, targets: Sequence[float]) -> list[Cell]:
    b = g.binary
    auc = f"{b.auc:.3f} ({b.auc_ci_low:.3f}-{b.auc_ci_high:.3f})" if b is not None else "—"
    return [
        g.name,
        str(g.n_slides),
        str(g.n_positive),
        str(g.n_scored),
        f"{g.n_inadequate} ({g.n_inadequate_positive})",
        f"{g.n_failed} ({g.n_failed_positive})",
        f"{g.n_rejected} ({g.n_rejected_positive})",
        str(g.n_without_truth),
        str(g.n_not_in_results),
        auc,
        _group_threshold(b),
        _rate(b, "sensitivity"),
        _rate(b, "specificity"),
        *_specificity_at(b, targets),
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


def _intro_blocks(ev: Evaluation) -> list[_Block]:
    """The title and what was evaluated: sources, models, threshold and CI methods."""
    m = ev.model
    level = round((1 - ev.config.alpha) * 100)
    thr = threshold_text(m.threshold, m.threshold_min, m.threshold_max, m.threshold_sources, 4)
    return [
        _Block("h1", "Smart-CCS screening evaluation"),
        _Block(
            "p",
            f"Results: {ev.results_uri or 'in-memory tables'}; ground truth: "
            f"{ev.truth_source or 'given table'}; batches: {', '.join(ev.partitions) or 'none'}; "
            f"screening runs: {', '.join(ev.run_ids) or 'none'}. Generated {ev.created_at}.",
        ),
        _Block(
            "p",
            f"Models: classifier {m.classifier or '—'}, detector {m.detector or '—'}, "
            f"encoder {m.encoder or '—'}; operating threshold {thr}. AUC CI: {level}% "
            f"stratified bootstrap, {ev.config.n_boot} resamples, seed {ev.config.seed}; "
            f"sensitivity and specificity CIs: {level}% Wilson score.",
        ),
        _Block("p", _operating_point(m)),
    ]


def _screening_blocks(ev: Evaluation) -> list[_Block]:
    """The slide-level abnormal-vs-NILM section: per-group table, how to read it, ROC."""
    level = round((1 - ev.config.alpha) * 100)
    targets = ev.config.sensitivity_targets
    header = [
        "group",
        "slides",
        "abnormal",
        "scored",
        "inadequate (abn.)",
        "failed (abn.)",
        "rejected (abn.)",
        "no truth",
        "not in results",
        f"AUC ({level}% CI)",
        "threshold",
        f"sensitivity ({level}% CI)",
        f"specificity ({level}% CI)",
        *(f"specificity at sensitivity {t:.2f}" for t in targets),
        "note",
    ]
    return [
        _Block("h2", "Slide-level screening (abnormal vs NILM)"),
        _Block("table", header=header, rows=[_screening_row(g, targets) for g in ev.groups]),
        _Block(
            "p",
            "Sensitivity and specificity count each slide at the threshold the platform called "
            "it at (the one stored with the classifier, or that operating point carried to the "
            "slide's center), not at one global threshold; the threshold column gives their "
            "range where a group's slides were called at several. Specificity at sensitivity s "
            "is read off each group's own ROC (the highest specificity of a point reaching s): "
            "what the ranking allows with a threshold tuned on these slides, for comparison.",
        ),
        _Block("img", "roc.png", items=["ROC curves"]),
    ]


def _grade_blocks(ev: Evaluation) -> list[_Block]:
    """The slide-grade section: confusion figure and the overall confusion table."""
    o = ev.overall.confusion
    return [
        _Block("h2", "Slide grades"),
        _Block("p", "Scored slides by true grade (rows) and predicted grade (columns)."),
        _Block("img", "confusion.png", items=["grade confusion matrices"]),
        _Block(
            "table",
            header=["true \\ predicted", *o.labels],
            rows=[
                [lab, *(str(v) for v in row)] for lab, row in zip(o.labels, o.counts, strict=True)
            ],
        ),
    ]


def _detection_blocks(ev: Evaluation) -> list[_Block]:
    """The cell-detection section: per-class AP for each group."""
    return [
        _Block("h2", f"Cell detection (AP at IoU {ev.config.iou:g})"),
        _Block("p", DETECTION_NOTE + " Each cell: AP (kept cells / annotated cells)."),
        _Block(
            "table",
            header=["group", "annotated slides", *ABNORMAL_CLASSES, "mAP", "note"],
            rows=_detection_rows(ev),
        ),
    ]


def _slide_row(f: SlideFigure) -> list[Cell]:
    """One slide's line in the slide list, linking its figures (or saying why there are none)."""
    return [
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


def _slide_blocks(figures: list[SlideFigure], n_candidates: int) -> list[_Block]:
    """The per-slide section: which slides got figures, and the list linking them."""
    header = [
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
    ]
    return [
        _Block("h2", "Slides"),
        _Block(
            "p",
            f"Figures for {len(figures)} of {n_candidates} scored slides: every abnormal slide "
            "(by truth) first, then the highest scores. Heatmap: score-weighted density of the "
            "kept abnormal cells on a thumbnail; cells: the top kept cells of each class.",
        ),
        _Block("table", header=header, rows=[_slide_row(f) for f in figures]),
    ]


def _blocks(ev: Evaluation, figures: list[SlideFigure], n_candidates: int) -> list[_Block]:
    """The whole report as one document, rendered alike to Markdown and HTML."""
    return [
        *_intro_blocks(ev),
        *_screening_blocks(ev),
        *_grade_blocks(ev),
        *_detection_blocks(ev),
        *_slide_blocks(figures, n_candidates),
        _Block("h2", "Rules"),
        _Block("ul", items=ev.rules),
    ]


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
        figures = slide_figures(
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
