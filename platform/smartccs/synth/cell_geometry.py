"""Per-cell geometry derived from the contours: ground-truth boxes, reach and areas.

Boxes and reach are filled once when a specimen is made (the spatial index and region queries
need the reach); areas are computed only when ground truth is written.
"""

from __future__ import annotations

import numpy as np

from smartccs.synth.contour import contour_extent, contour_table


def fill_box_and_reach(cells: np.ndarray, chunk: int = 8192) -> None:
    """Fill ``reach`` and ``box`` from each cell's contour and nuclei."""
    for s in range(0, len(cells), chunk):
        c = cells[s : s + chunk]
        box = contour_extent(
            c["x"],
            c["y"],
            c["radius"],
            c["aspect"],
            c["theta"],
            c["shape"],
            c["tail"],
            c["tail_dir"],
        )
        has_nuc = c["nuc_radius"] > 0
        for dx, dy, on in (
            (c["nuc_dx"], c["nuc_dy"], has_nuc),
            (c["nuc2_dx"], c["nuc2_dy"], has_nuc & c["binucleate"]),
        ):
            scale = np.maximum(c["halo"], 1.0) * c["nuc_radius"]
            nb = contour_extent(
                c["x"] + dx, c["y"] + dy, scale, c["nuc_aspect"], c["nuc_theta"], c["nuc_shape"]
            )
            box[on, :2] = np.minimum(box[on, :2], nb[on, :2])
            box[on, 2:] = np.maximum(box[on, 2:], nb[on, 2:])
        c["box"] = box
        reach = np.max(np.abs(box - np.stack([c["x"], c["y"], c["x"], c["y"]], axis=1)), axis=1)
        c["reach"] = reach * 1.05 + 0.5


def cell_areas(cells: np.ndarray, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Cytoplasm and total nuclear area per cell, um^2 (pi * mean squared contour radius)."""
    cyto = np.empty(len(cells))
    nuc = np.empty(len(cells))
    for s in range(0, len(cells), chunk):
        c = cells[s : s + chunk]
        rel_tail = c["tail"] / np.maximum(c["radius"], 1e-6)
        t = contour_table(c["shape"], rel_tail, c["tail_dir"])
        cyto[s : s + chunk] = np.pi * c["radius"] ** 2 * np.mean(t.astype(np.float64) ** 2, 1)
        t = contour_table(c["nuc_shape"])
        nuclei = 1 + c["binucleate"].astype(np.float64)
        nuc[s : s + chunk] = np.pi * c["nuc_radius"] ** 2 * np.mean(t.astype(np.float64) ** 2, 1)
        nuc[s : s + chunk] *= nuclei
    return cyto, nuc
