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

from smartccs.metrics.cell_density import cell_boxes, density_map, density_rgba

GRID_MPP = 12.0
"""µm per heatmap pixel: a cell-cluster's scale (the report's default)."""
SIGMA_UM = 80.0
UNIT = "abnormal cells / mm² (score-weighted)"


def batch_scale(slides: pa.Table, cells: pa.Table) -> float:
    """The densest spot over a batch's slides (its ``slides`` and ``cells`` rows; 0 when none
    kept a cell): the top of the batch's one colour scale. No slide is opened: the density
    only needs the cells' level-0 boxes and each slide's µm/px."""
    peak = 0.0
    for s in slides.to_pylist():
        boxes, scores = cell_boxes(cells.filter(pc.equal(cells["slide_id"], s["slide_id"])))
        if not len(boxes) or not s["slide_mpp"]:
            continue
        w, h = int(boxes[:, 2].max()) + 1, int(boxes[:, 3].max()) + 1
        density = density_map(w, h, s["slide_mpp"], boxes, scores, GRID_MPP, SIGMA_UM)
        peak = max(peak, float(density.max()))
    return peak


def heatmap_png(cells: pa.Table, size: tuple[int, int], mpp: float, vmax: float) -> bytes:
    """A slide's layer from its ``cells`` rows: an RGBA PNG covering the whole slide (level-0
    ``size`` px at ``mpp``; the page places it at the slide's level-0 origin), up to ``vmax``."""
    boxes, scores = cell_boxes(cells)
    density = density_map(*size, mpp, boxes, scores, GRID_MPP, SIGMA_UM)
    rgba = (density_rgba(density, vmax) * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    return buf.getvalue()
