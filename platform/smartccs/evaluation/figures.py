"""The report's figures as PNG files: ROC curves, grade confusion, per-slide heatmap and cells.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend switch), so
figures can be made from any thread or a Ray worker without a display.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from smartccs.evaluation.report import OVERALL, ConfusionMatrix, RocCurve, threshold_text
from smartccs.metrics.cell_density import DENSITY_CMAP, cell_boxes, density_map, density_rgba
from smartccs.slide.foreground import slide_at_mpp
from smartccs.slide.reader import Slide
from smartccs.taxonomy import ABNORMAL_CLASSES

__all__ = ["cell_gallery", "confusion_figure", "heatmap_density", "roc_figure", "slide_heatmap"]

DPI = 100
MIN_THUMB_PX = 512
MAX_THUMB_PX = 2048
"""The heatmap's thumbnail is made finer than asked if its longer side would be shorter than
``MIN_THUMB_PX`` (a small slide), coarser if it would exceed ``MAX_THUMB_PX``; never finer than
the slide itself."""


def _new_figure(width_in: float, height_in: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI, bbox_inches="tight")
    return path


def _thresholds(curves: Mapping[str, RocCurve]) -> str:
    """The curves' operating threshold: one value, or ``per center, low–high``."""
    lows = [c.threshold if c.threshold_min is None else c.threshold_min for c in curves.values()]
    highs = [c.threshold if c.threshold_max is None else c.threshold_max for c in curves.values()]
    values = [v for v in (*lows, *highs) if v is not None]
    if not values:
        return "—"
    low, high = min(values), max(values)
    return threshold_text(low if low == high else None, low, high)


def roc_figure(curves: Mapping[str, RocCurve], path: str | Path, title: str | None = None) -> Path:
    """One ROC per group (``overall`` drawn thick and black) on one PNG, AUC in the legend and
    each group's operating point marked with a dot: its slides called at their own thresholds
    (the legend gives the one threshold, or the range when they differ)."""
    fig = _new_figure(6.0, 6.0)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="0.7", lw=1)
    palette = colormaps["tab10"]
    others = [n for n in curves if n != OVERALL]
    order = ([OVERALL] if OVERALL in curves else []) + others
    for i, name in enumerate(order):
        c = curves[name]
        overall = name == OVERALL
        color = "black" if overall else palette(i % 10)
        ax.step(
            c.fpr,
            c.tpr,
            where="post",
            color=color,
            lw=2.5 if overall else 1.5,
            label=f"{name} (AUC {c.auc:.3f})",
            zorder=3 if overall else 2,
        )
        ax.plot(
            [c.operating_fpr],
            [c.operating_tpr],
            "o",
            color=color,
            ms=7,
            mec="white",
            zorder=4,
        )
    if not order:
        ax.text(0.5, 0.5, "no group has both classes", ha="center", va="center")
    else:
        ax.plot(
            [], [], "o", color="0.3", label=f"operating point (threshold {_thresholds(curves)})"
        )
        ax.legend(loc="lower right", fontsize=8)
    ax.set(
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
        xlabel="1 - specificity (false positive rate)",
        ylabel="sensitivity (true positive rate)",
        title=title or "Slide-level ROC: abnormal vs NILM",
        aspect="equal",
    )
    ax.grid(alpha=0.3)
    return _save(fig, path)


def confusion_figure(
    matrices: Mapping[str, ConfusionMatrix], path: str | Path, title: str | None = None
) -> Path:
    """One panel per group: slide counts by true grade (rows) and predicted grade (columns),
    coloured by the row fraction so that rare grades read as clearly as common ones."""
    names = list(matrices)
    n = max(1, len(names))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = _new_figure(4.6 * cols, 4.4 * rows)
    for k, name in enumerate(names):
        m = matrices[name]
        counts = np.asarray(m.counts, dtype=np.int64)
        totals = counts.sum(axis=1, keepdims=True)
        frac = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
        for (r, c), v in np.ndenumerate(counts):
            if v:
                ax.text(
                    c,
                    r,
                    str(v),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if frac[r, c] > 0.6 else "black",
                )
        ticks = range(len(m.labels))
        ax.set_xticks(ticks, m.labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(ticks, m.labels, fontsize=8)
        ax.set_xlabel("predicted grade")
        ax.set_ylabel("true grade")
        ax.set_title(f"{name} ({m.n} scored slides)", fontsize=10)
    if not names:
        fig.add_subplot().text(0.5, 0.5, "no groups", ha="center", va="center")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _heatmap_mpp(slide: Slide, mpp: float) -> float:
    """The heatmap's µm/px: ``mpp``, made finer for a small slide (``MIN_THUMB_PX``) and
    coarser for a large one (``MAX_THUMB_PX``), as ``slide_at_mpp`` makes its thumbnail."""
    info = slide.info
    longest_um = max(info.width, info.height) * info.mpp
    return max(min(mpp, longest_um / MIN_THUMB_PX), longest_um / MAX_THUMB_PX, info.mpp)


def heatmap_density(
    slide: Slide, cells: pa.Table, mpp: float = 12.0, sigma_um: float = 80.0
) -> tuple[np.ndarray, float]:
    """Score-weighted abnormal cells per mm² on the heatmap's grid, and the grid's µm/px."""
    mpp = _heatmap_mpp(slide, mpp)
    boxes, scores = cell_boxes(cells)
    info = slide.info
    return density_map(info.width, info.height, info.mpp, boxes, scores, mpp, sigma_um), mpp


def slide_heatmap(
    slide: Slide,
    cells: pa.Table,
    path: str | Path,
    mpp: float = 12.0,
    sigma_um: float = 80.0,
    title: str | None = None,
    vmax: float | None = None,
    scale_note: str = "",
) -> Path:
    """A thumbnail of the slide at about ``mpp`` µm/px (see ``MIN_THUMB_PX``) with the density
    of its kept abnormal cells over it: a score-weighted histogram of the ``cells`` rows' box
    centres (level-0 ``x0, y0, x1, y1``, ``score``), Gaussian-smoothed (``sigma_um``), drawn as
    a colormap whose opacity grows with the density, and a colourbar in score-weighted cells
    per mm².

    ``vmax`` fixes the top of the colour scale, so a report draws every slide on one scale and
    a NILM slide with a few weak detections looks cold beside an HSIL one; without it the
    slide's own peak is the top, and a heatmap says where, not how much."""
    density, mpp = heatmap_density(slide, cells, mpp, sigma_um)
    thumb = slide_at_mpp(slide, mpp)
    h, w = thumb.shape[:2]
    n_cells = cells.num_rows
    if vmax is None or vmax <= 0:
        vmax = float(density.max()) if density.size and density.max() > 0 else 1.0
    norm = Normalize(0.0, vmax)
    cmap = colormaps[DENSITY_CMAP]
    overlay = density_rgba(density, vmax)

    w_mm, h_mm = w * mpp / 1000.0, h * mpp / 1000.0
    aspect = h / max(w, 1)
    fig = _new_figure(7.0, max(2.5, min(12.0, 6.0 * aspect)))
    ax = fig.add_subplot()
    extent = (0.0, w_mm, h_mm, 0.0)
    ax.imshow(thumb, extent=extent, interpolation="bilinear")
    ax.imshow(overlay, extent=extent, interpolation="bilinear")
    ax.set_xlabel("mm")
    ax.set_ylabel("mm")
    ax.set_title(title or f"{slide.name}: {n_cells} kept abnormal cells", fontsize=10)
    fig.colorbar(
        ScalarMappable(norm=norm, cmap=cmap),
        ax=ax,
        fraction=0.046,
        pad=0.04,
        label="abnormal cells / mm² (score-weighted)" + (f"\n{scale_note}" if scale_note else ""),
    )
    return _save(fig, path)


def cell_gallery(
    slide: Slide,
    cells: pa.Table,
    path: str | Path,
    per_class: int = 8,
    crop_um: float = 56.0,
    title: str | None = None,
) -> Path:
    """A grid of the slide's top cells: one row per abnormal class present in ``cells``
    (``cell_class``, ``score``, level-0 box), up to ``per_class`` crops of ``crop_um`` µm read
    at level 0 around each box centre, highest score first, with the box outlined and each
    crop titled with its class and score."""
    info = slide.info
    side = max(8, round(crop_um / info.mpp))
    boxes, scores = cell_boxes(cells)
    classes = np.asarray(cells["cell_class"].to_pylist() if cells.num_rows else [], dtype=object)
    present = [c for c in ABNORMAL_CLASSES if (classes == c).any()]
    if not present:
        fig = _new_figure(5.0, 1.5)
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, f"{slide.name}: no abnormal cells kept", ha="center", va="center")
        ax.axis("off")
        return _save(fig, path)
    cols = max(1, per_class)
    fig = _new_figure(1.6 * cols, 1.8 * len(present) + 0.4)
    for r, cls in enumerate(present):
        idx = np.flatnonzero(classes == cls)
        idx = idx[np.argsort(-scores[idx], kind="stable")][:cols]
        for c in range(cols):
            ax = fig.add_subplot(len(present), cols, r * cols + c + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(idx):
                ax.axis("off")
                continue
            x0, y0, x1, y1 = boxes[idx[c]]
            ox = round((x0 + x1) / 2 - side / 2)
            oy = round((y0 + y1) / 2 - side / 2)
            ax.imshow(slide.read_rgb(0, ox, oy, side, side))
            ax.add_patch(
                Rectangle(
                    (x0 - ox - 0.5, y0 - oy - 0.5),
                    x1 - x0,
                    y1 - y0,
                    fill=False,
                    edgecolor="yellow",
                    lw=1.0,
                )
            )
            ax.set_xlim(-0.5, side - 0.5)
            ax.set_ylim(side - 0.5, -0.5)
            ax.set_title(f"{cls} {scores[idx[c]]:.2f}", fontsize=8)
            if c == 0:
                ax.set_ylabel(cls, fontsize=9)
    fig.suptitle(
        title or f"{slide.name}: top kept cells per class ({crop_um:g} µm crops)", fontsize=10
    )
    return _save(fig, path)
