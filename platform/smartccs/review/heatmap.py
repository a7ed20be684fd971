"""The viewer's heatmap layer: where a slide's kept abnormal cells are, on one scale per batch.

The density is the report's (smartccs.metrics.cell_density: score-weighted abnormal cells per
mm², 80 µm smoothing), on a 12 µm/px grid over the whole slide, drawn as a PNG the page lays
over the slide. Its colour scale tops out at the densest spot of the batch's slides, said on the
page's legend, so slides of a batch compare at a glance and a NILM slide's few weak detections
stay cold beside an HSIL slide.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from smartccs.metrics.cell_density import density_map, density_rgba
from smartccs.results.tables import read_table
from smartccs.store import Store

GRID_MPP = 12.0
"""µm per heatmap pixel: a cell-cluster's scale (the report's default)."""
SIGMA_UM = 80.0
UNIT = "abnormal cells / mm² (score-weighted)"


def _boxes(cells: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    cols = [cells[c].to_numpy(zero_copy_only=False) for c in ("x0", "y0", "x1", "y1")]
    boxes = np.stack(cols, axis=1).astype(np.float64) if cells.num_rows else np.zeros((0, 4))
    return boxes, cells["score"].to_numpy(zero_copy_only=False).astype(np.float64)


def batch_scale(store: Store, center: str, batch: str) -> float:
    """The densest spot over the batch's slides (0 when none kept a cell): the top of the
    batch's one colour scale. Read from the tables alone, no slide is opened: the density only
    needs the cells' level-0 boxes and each slide's µm/px."""
    slides = read_table(store, "slides", centers=[center], batches=[batch]).to_pylist()
    cells = read_table(store, "cells", centers=[center], batches=[batch])
    peak = 0.0
    for s in slides:
        mine = cells.filter(pc.equal(cells["slide_id"], s["slide_id"]))
        if not mine.num_rows or not s["slide_mpp"]:
            continue
        boxes, scores = _boxes(mine)
        w, h = int(boxes[:, 2].max()) + 1, int(boxes[:, 3].max()) + 1
        density = density_map(w, h, s["slide_mpp"], boxes, scores, GRID_MPP, SIGMA_UM)
        peak = max(peak, float(density.max()))
    return peak


def heatmap_png(
    store: Store, center: str, batch: str, slide_id: str, size: tuple[int, int], mpp: float
) -> bytes:
    """The slide's layer: an RGBA PNG covering the whole slide (level-0 ``size`` px at
    ``mpp``; the page places it at the slide's level-0 origin), on the batch's scale."""
    cells = read_table(store, "cells", centers=[center], batches=[batch])
    boxes, scores = _boxes(cells.filter(pc.equal(cells["slide_id"], slide_id)))
    density = density_map(*size, mpp, boxes, scores, GRID_MPP, SIGMA_UM)
    vmax = batch_scale(store, center, batch)
    rgba = (density_rgba(density, vmax) * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    return buf.getvalue()
