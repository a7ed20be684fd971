"""One cell's stain laid onto the stain planes of a region: cytoplasm, halo, nuclei, chromatin.

This is the renderer's inner loop. Each cell is drawn on its own bounding box from analytic
distance-to-contour ramps (so focus blur needs no convolution), and cells smaller than a pixel
are splatted in one vectorised pass; the renderer then turns the planes into colour and noise.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from smartccs.synth.cell_table import CELL_DTYPE
from smartccs.synth.contour import contour_table
from smartccs.synth.texture import sample_texture

LUT_SIZE = 512
"""Angular samples of a contour lookup table (0.7 degrees)."""

CYTOPLASM_RIM = 0.35
"""Extra stain along a cell's border, where thin cytoplasm curls."""
CYTOPLASM_RIM_UM = 1.5
CHROMATIN_TEXEL_UM = 0.2
SPREAD = 2.5
"""How far (in contour ramps) a drawing may reach beyond the cell's ``reach``: half a ramp of
anti-aliasing, plus features narrower than a ramp being drawn a ramp wide."""
HALO_CLEARING = 0.9
"""Fraction of cytoplasm stain missing inside a koilocytic halo."""
NUCLEAR_RIM = 0.35
"""Extra hematoxylin along the nuclear membrane (chromatin margination)."""


class CellRecord(NamedTuple):
    """One CELL_DTYPE row as Python scalars, for the per-cell drawing loop."""

    kind: int
    group: int
    x: float
    y: float
    radius: float
    aspect: float
    theta: float
    shape: list
    tail: float
    tail_dir: float
    density: float
    stain: list
    nuc_dx: float
    nuc_dy: float
    nuc_radius: float
    nuc_aspect: float
    nuc_theta: float
    nuc_shape: list
    nuc_darkness: float
    chromatin: float
    halo: float
    binucleate: bool
    nuc2_dx: float
    nuc2_dy: float
    reach: float
    box: list


assert CellRecord._fields == CELL_DTYPE.names, "keep CellRecord in step with CELL_DTYPE"


class Blur(NamedTuple):
    """Blur and pixel footprint at one resolution, as the drawing loop needs them."""

    edge: float  # contour ramp width, um
    chromatin_damping: float


def _span(coords: np.ndarray, centre: float, reach: float) -> tuple[int, int]:
    """Index range of sorted pixel-centre ``coords`` within ``reach`` of ``centre``."""
    lo = int(np.searchsorted(coords, centre - reach, "left"))
    hi = int(np.searchsorted(coords, centre + reach, "right"))
    return lo, hi


def _distance_to_contour(
    dx: np.ndarray,
    dy: np.ndarray,
    radius: float,
    aspect: float,
    theta: float,
    table: np.ndarray,
) -> np.ndarray:
    """Contour radius minus pixel radius (um, ellipse-normalised) on the grid dx x dy.

    Positive inside. The contour comes from a per-cell lookup table by angle, which costs far
    less per pixel than summing harmonics.
    """
    c, s = math.cos(theta), math.sin(theta)
    u = np.add.outer(dy * np.float32(s / aspect), dx * np.float32(c / aspect))
    v = np.add.outer(dy * np.float32(c * aspect), dx * np.float32(-s * aspect))
    angle = np.arctan2(v, u)
    rho = u
    rho *= u
    v2 = v * v
    rho += v2
    np.sqrt(rho, out=rho)
    angle *= np.float32(LUT_SIZE / (2 * np.pi))
    angle += np.float32(LUT_SIZE + 0.5)
    idx = angle.astype(np.int32)
    idx &= LUT_SIZE - 1
    d = np.take(table, idx)
    d *= np.float32(radius)
    d -= rho
    return d


def _coverage(d: np.ndarray, edge: float) -> np.ndarray:
    """Anti-aliased inside fraction from the signed distance (a one-pixel ramp)."""
    d *= np.float32(1.0 / edge)
    d += np.float32(0.5)
    return _clip01(d)


def _clip01(a: np.ndarray) -> np.ndarray:
    """In-place clip to [0, 1] (np.clip's wrapper costs more than the work on small boxes)."""
    np.maximum(a, 0.0, out=a)
    np.minimum(a, 1.0, out=a)
    return a


def _ramp(d: np.ndarray, width: float) -> np.ndarray:
    """1 at the contour falling to 0 at ``width`` inside: where borders gather stain."""
    r = d * np.float32(-1.0 / width)
    r += 1.0
    return _clip01(r)


def draw_cell(planes: np.ndarray, xs: np.ndarray, ys: np.ndarray, o: Blur, c: CellRecord) -> None:
    """Add one cell's cytoplasm (with halo) and nuclei to the stain planes, on its box only."""
    edge = o.edge
    j0, j1 = _span(xs, c.x, c.reach + SPREAD * edge)
    i0, i1 = _span(ys, c.y, c.reach + SPREAD * edge)
    if j0 >= j1 or i0 >= i1:
        return
    dx = (xs[j0:j1] - c.x).astype(np.float32)
    dy = (ys[i0:i1] - c.y).astype(np.float32)
    shape = np.asarray(c.shape, np.float32)[None]
    nuc_shape = np.asarray(c.nuc_shape, np.float32)[None]
    nuc_table = contour_table(nuc_shape, samples=LUT_SIZE)[0] if c.nuc_radius > 0 else None
    nuclei = [(c.nuc_dx, c.nuc_dy)] + ([(c.nuc2_dx, c.nuc2_dy)] if c.binucleate else [])

    # Features narrower than the ramp keep their stain mass: drawn wider, proportionally fainter.
    floor = 0.7 * edge
    radius = max(c.radius, floor)
    density = c.density * (c.radius / radius) ** 2
    if density > 0:
        rel_tail = np.array([c.tail / c.radius]) if c.tail else None
        table = contour_table(shape, rel_tail, np.array([c.tail_dir]), LUT_SIZE)[0]
        d = _distance_to_contour(dx, dy, radius, c.aspect, c.theta, table)
        rim = _ramp(d, CYTOPLASM_RIM_UM)
        cov = _coverage(d, edge)
        rim *= np.float32(CYTOPLASM_RIM)
        rim += 1.0
        cov *= rim
        if c.halo > 0 and nuc_table is not None:
            halo_r = max(c.nuc_radius * c.halo, floor)
            for ndx, ndy in nuclei:
                a0, a1 = _span(dx, ndx, halo_r * c.nuc_aspect * 1.7 + edge)
                b0, b1 = _span(dy, ndy, halo_r * c.nuc_aspect * 1.7 + edge)
                if a0 < a1 and b0 < b1:
                    d = _distance_to_contour(
                        dx[a0:a1] - ndx,
                        dy[b0:b1] - ndy,
                        halo_r,
                        c.nuc_aspect,
                        c.nuc_theta,
                        nuc_table,
                    )
                    cov[b0:b1, a0:a1] *= 1.0 - HALO_CLEARING * _coverage(d, edge)
        for s, weight in enumerate(c.stain, start=1):
            if weight > 0:
                planes[s, i0:i1, j0:j1] += cov * np.float32(density * weight)

    if nuc_table is None:
        return
    nuc_r = max(c.nuc_radius, floor)
    darkness = c.nuc_darkness * (c.nuc_radius / nuc_r) ** 2
    granularity = c.chromatin * o.chromatin_damping
    offset = (round(c.x * 7.0) ^ round(c.y * 13.0)) % 4096
    for ndx, ndy in nuclei:
        reach = nuc_r * c.nuc_aspect * 1.7 + edge
        a0, a1 = _span(dx, ndx, reach)
        b0, b1 = _span(dy, ndy, reach)
        if a0 >= a1 or b0 >= b1:
            continue
        d = _distance_to_contour(
            dx[a0:a1] - ndx, dy[b0:b1] - ndy, nuc_r, c.nuc_aspect, c.nuc_theta, nuc_table
        )
        rim = _ramp(d, 0.3 * nuc_r)
        tex = sample_texture(
            xs[j0 + a0 : j0 + a1], ys[i0 + b0 : i0 + b1], CHROMATIN_TEXEL_UM, offset
        )
        tex *= np.float32(granularity)
        tex += 1.0
        tex += rim * np.float32(NUCLEAR_RIM)
        np.maximum(tex, 0.05, out=tex)
        tex *= _coverage(d, edge)
        tex *= np.float32(darkness)
        planes[0, i0 + b0 : i0 + b1, j0 + a0 : j0 + a1] += tex


def splat_cells(planes: np.ndarray, x0: float, y0: float, p: float, cells: np.ndarray) -> None:
    """Cells smaller than a pixel: add their stain mass bilinearly at their centres."""
    _, h, w = planes.shape
    area = np.pi / (p * p)
    nuclei = 1 + cells["binucleate"].astype(np.float32)
    mass = np.empty((len(cells), 4), np.float64)
    mass[:, 0] = cells["nuc_darkness"] * cells["nuc_radius"] ** 2 * nuclei * area
    mass[:, 1:] = (cells["density"] * cells["radius"] ** 2 * area)[:, None] * cells["stain"]
    fx = (cells["x"] - x0) / p - 0.5
    fy = (cells["y"] - y0) / p - 0.5
    ix, iy = np.floor(fx).astype(np.int64), np.floor(fy).astype(np.int64)
    tx, ty = fx - ix, fy - iy
    flat = planes.reshape(4, -1)
    for oy, ox, wgt in (
        (0, 0, (1 - tx) * (1 - ty)),
        (0, 1, tx * (1 - ty)),
        (1, 0, (1 - tx) * ty),
        (1, 1, tx * ty),
    ):
        jx, jy = ix + ox, iy + oy
        ok = (jx >= 0) & (jx < w) & (jy >= 0) & (jy < h)
        if not ok.any():
            continue
        pos = jy[ok] * w + jx[ok]
        for s in range(4):
            flat[s] += np.bincount(pos, weights=mass[ok, s] * wgt[ok], minlength=h * w).astype(
                np.float32
            )
