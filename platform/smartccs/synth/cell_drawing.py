"""Cells of one kind at given centres, every parameter drawn from that kind's morphology.

The one place random numbers become cell parameters (size, shape, stain, nuclei, halos, tails),
shared by slide generation, hand-placed galleries and tests; where cells go is decided elsewhere.
"""

from __future__ import annotations

import numpy as np

from smartccs.synth.cell_table import CELL_DTYPE, HARMONICS, KIND_CODE
from smartccs.synth.morphology import MORPHOLOGY, Range


def draw_cells(
    rng: np.random.Generator, kind: str, xy: np.ndarray, group: np.ndarray | None = None
) -> np.ndarray:
    """Cells of one kind at the given centres (um), parameters drawn from its morphology."""
    m = MORPHOLOGY[kind]
    n = len(xy)
    c = np.zeros(n, CELL_DTYPE)
    if n == 0:
        return c

    def u(r: Range) -> np.ndarray:
        return rng.uniform(r[0], r[1], n)

    c["kind"] = KIND_CODE[kind]
    c["group"] = -1 if group is None else group
    c["x"], c["y"] = xy[:, 0], xy[:, 1]
    c["radius"] = u(m.radius)
    c["aspect"] = np.sqrt(u(m.elongation))
    c["theta"] = rng.uniform(0, np.pi, n)
    c["shape"] = _harmonics(rng, n, m.irregularity, first=1)
    c["density"] = u(m.density)
    c["stain"] = np.stack([u(m.eosin), u(m.light_green), u(m.orange)], axis=1)
    if m.tail:
        has_tail = rng.random(n) < m.tail
        c["tail"] = np.where(has_tail, u(m.tail_length) * c["radius"], 0.0)
        c["tail_dir"] = rng.integers(0, 2, n) * np.pi

    nuc = u(m.nc) * c["radius"] if m.nc else u(m.nucleus)
    c["nuc_radius"] = nuc
    c["nuc_aspect"] = np.sqrt(u(m.nucleus_elongation))
    c["nuc_theta"] = c["theta"] + rng.normal(0, 0.3, n)  # nuclei follow the cell's long axis
    irregular = u(m.nucleus_irregularity)
    if m.lobes:
        shape = np.zeros((n, HARMONICS, 2), np.float32)
        lobes = rng.integers(2, m.lobes + 2, n)  # 2 to lobes+1 segments
        phase = rng.uniform(0, 2 * np.pi, n)
        shape[np.arange(n), lobes - 1, 0] = irregular * np.cos(phase)
        shape[np.arange(n), lobes - 1, 1] = irregular * np.sin(phase)
        c["nuc_shape"] = shape
    else:
        c["nuc_shape"] = _harmonics(rng, n, 1.0, first=2) * irregular[:, None, None]
    angle = rng.uniform(0, 2 * np.pi, n)
    dist = rng.uniform(0, m.offset, n) * c["radius"]
    c["nuc_dx"], c["nuc_dy"] = dist * np.cos(angle), dist * np.sin(angle)
    c["nuc_darkness"] = u(m.darkness)
    c["chromatin"] = u(m.chromatin)
    c["halo"] = u(m.halo)
    if m.binucleate:
        two = rng.random(n) < m.binucleate
        # Two touching nuclei, each 0.85 of the single size, either side of the old centre.
        dx = np.cos(c["nuc_theta"]) * nuc * 0.85
        dy = np.sin(c["nuc_theta"]) * nuc * 0.85
        c["binucleate"] = two
        c["nuc2_dx"] = np.where(two, c["nuc_dx"] - dx, 0.0)
        c["nuc2_dy"] = np.where(two, c["nuc_dy"] - dy, 0.0)
        c["nuc_dx"] = np.where(two, c["nuc_dx"] + dx, c["nuc_dx"])
        c["nuc_dy"] = np.where(two, c["nuc_dy"] + dy, c["nuc_dy"])
        c["nuc_radius"] = np.where(two, nuc * 0.85, nuc)
    return c


def _harmonics(rng: np.random.Generator, n: int, amplitude: float, first: int) -> np.ndarray:
    """Random contour harmonics whose amplitude falls as 1/k, from harmonic ``first`` on."""
    k = np.arange(1, HARMONICS + 1, dtype=np.float32)
    # Clipped so that contours stay star-shaped (radius > 0 at every angle).
    coef = np.clip(rng.normal(0.0, 1.0, (n, HARMONICS, 2)), -2.5, 2.5).astype(np.float32)
    coef *= (amplitude / k)[None, :, None]
    coef[:, : first - 1] = 0.0
    if first == 1:
        coef[:, 0] *= 0.3  # a small egg-shaped asymmetry, not a shifted disc
    return coef
