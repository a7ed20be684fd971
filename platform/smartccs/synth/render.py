"""Pap-stained pixels from a specimen: stain in optical density, then optics, then sensor.

Stains add in optical-density space (Beer-Lambert), so overlapping cells darken the way real
overlapping cytoplasm does and each center's stain is just a 4x3 matrix. A region's pixels
depend only on the specimen, the profile, the region's physical position and the seed, never
on which tiles were drawn before: tiles can be drawn in any order or process, and the same
region is bit-identical every time. Pixels are sampled at their centres in microns, so one
specimen scanned at 0.25 and at 0.5 um/px gives the same picture at two resolutions.

Optics are analytic: a Gaussian focus blur of sigma turns every contour into a ramp about
sigma * sqrt(2 pi) wide (combined with the pixel's own width) and damps fine texture the way a
Gaussian filter damps a Gaussian-correlated field, so no convolution pass is needed and tiles
need no margin. Sensor noise is added last.

Speed: background-only regions are a slice of a precomputed noise texture at a seeded offset;
otherwise only cells whose reach meets the region are drawn, each on its own bounding box, and
cells smaller than a pixel (thumbnail levels) are splatted in one vectorised pass.
"""

from __future__ import annotations

import functools
import hashlib
import math
import struct
from typing import NamedTuple

import numpy as np

from smartccs.stain import grey_axis_rotation
from smartccs.synth.profiles import CenterProfile, StainProfile
from smartccs.synth.specimen import CELL_DTYPE, Specimen, contour_table

LUT_SIZE = 512
"""Angular samples of a contour lookup table (0.7 degrees)."""

NOISE_SIZE = 1024
NOISE_PAD = 512
"""Regions up to NOISE_PAD px on a side take a noise slice; larger ones wrap indices."""

TEXTURE_SIZE = 512
TEXTURE_SMOOTH_TEXELS = 3.0
"""Correlation length of the texture in texels: granules span several pixels, not one."""
CYTOPLASM_TEXEL_UM = 0.4
CYTOPLASM_MOTTLE = 0.12
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


class _Cell(NamedTuple):
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


assert _Cell._fields == CELL_DTYPE.names, "keep _Cell in step with CELL_DTYPE"


class Optics:
    """What a center's stain, microscope and camera do, precomputed once per profile."""

    def __init__(self, profile: CenterProfile):
        self.stain_matrix = stain_matrix(profile.stain)
        bg = np.minimum(np.array(profile.background, np.float32) * profile.brightness, 255.0)
        self.background = bg
        self.blur_um = profile.blur_um
        rng = np.random.default_rng(_stable_int(profile.name, "noise"))
        side = NOISE_SIZE + NOISE_PAD
        noise = rng.normal(0.0, profile.noise_sigma, (side, side, 3))
        self.noise = np.clip(np.round(noise), -127, 127).astype(np.int8)
        self.empty = np.clip(np.round(bg + noise), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=16)
def _optics(profile_json: str) -> Optics:
    return Optics(CenterProfile.model_validate_json(profile_json))


def optics_for(profile: CenterProfile) -> Optics:
    """Cached per profile content: the noise texture is the costly part."""
    return _optics(profile.model_dump_json())


def stain_matrix(stain: StainProfile) -> np.ndarray:
    """(4, 3) OD per unit of hematoxylin, eosin, light green, orange G, after hue/saturation."""
    grey = np.full(3, 1.0 / math.sqrt(3.0))
    rotation = grey_axis_rotation(stain.hue_shift_deg)
    rows = []
    for vec in (stain.hematoxylin, stain.eosin, stain.light_green, stain.orange_g):
        v = np.asarray(vec, np.float64)
        v = rotation @ (v / np.linalg.norm(v))
        g = grey * (grey @ v)
        rows.append(np.maximum(g + stain.saturation * (v - g), 0.0))
    m = np.stack(rows) * stain.intensity
    m[0] *= stain.hematoxylin_scale
    return m.astype(np.float32)


@functools.cache
def _texture() -> np.ndarray:
    """A smooth periodic noise (std 1) for chromatin granules and cytoplasm mottling."""
    rng = np.random.default_rng(20250214)
    white = rng.normal(size=(TEXTURE_SIZE, TEXTURE_SIZE))
    f = np.fft.fftfreq(TEXTURE_SIZE)
    gauss = np.exp(-2 * (np.pi * TEXTURE_SMOOTH_TEXELS) ** 2 * (f[:, None] ** 2 + f[None, :] ** 2))
    smooth = np.fft.ifft2(np.fft.fft2(white) * gauss).real
    smooth = (smooth - smooth.mean()) / smooth.std()
    return np.clip(smooth, -3, 3).astype(np.float32)


def _sample_texture(xs: np.ndarray, ys: np.ndarray, texel_um: float, offset: int) -> np.ndarray:
    """The texture at physical positions (nearest texel), so it is the same at any mpp."""
    ix = (np.floor(xs / texel_um).astype(np.int64) + offset) % TEXTURE_SIZE
    iy = (np.floor(ys / texel_um).astype(np.int64) + offset * 7) % TEXTURE_SIZE
    return np.take(np.take(_texture(), iy, axis=0), ix, axis=1)


def _stable_int(*parts: object) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _noise_offset(seed: int, x_um: float, y_um: float, um_per_px: float) -> tuple[int, int]:
    """Where in the noise texture a region starts: a hash of its physical position."""
    key = struct.pack(
        "<qqqq", seed & (2**63 - 1), round(x_um * 1000), round(y_um * 1000), round(um_per_px * 1e6)
    )
    h = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return h % NOISE_SIZE, (h >> 20) % NOISE_SIZE


def _texture_slice(texture: np.ndarray, ox: int, oy: int, w: int, h: int) -> np.ndarray:
    if w <= NOISE_PAD and h <= NOISE_PAD:
        return texture[oy : oy + h, ox : ox + w]
    iy = (np.arange(h) + oy) % NOISE_SIZE
    ix = (np.arange(w) + ox) % NOISE_SIZE
    return np.take(np.take(texture, iy, axis=0), ix, axis=1)


def render_region(
    specimen: Specimen,
    profile: CenterProfile,
    x_um: float,
    y_um: float,
    w_px: int,
    h_px: int,
    um_per_px: float,
    seed: int,
) -> np.ndarray:
    """uint8 (h, w, 3) of the region whose top-left corner is (x_um, y_um), as the center scans."""
    return Renderer(specimen, profile, seed).region(x_um, y_um, w_px, h_px, um_per_px)


class Renderer:
    """Renders regions of one specimen as one center's scanner sees it."""

    def __init__(self, specimen: Specimen, profile: CenterProfile, seed: int):
        self.specimen = specimen
        self.optics = optics_for(profile)
        self.seed = seed

    def region(self, x_um: float, y_um: float, w: int, h: int, um_per_px: float) -> np.ndarray:
        """See ``render_region``."""
        o, p = self.optics, um_per_px
        ox, oy = _noise_offset(self.seed, x_um, y_um, p)
        # Focus blur and pixel footprint, as a contour ramp width (um) and texture damping.
        edge = math.hypot(p, o.blur_um * math.sqrt(2 * math.pi))
        sigma2 = o.blur_um**2 + p * p / 12.0
        pad = SPREAD * edge
        ids = self.specimen.query(x_um - pad, y_um - pad, x_um + w * p + pad, y_um + h * p + pad)
        if len(ids) == 0:
            return np.ascontiguousarray(_texture_slice(o.empty, ox, oy, w, h))

        blur = _Blur(edge, _damping(CHROMATIN_TEXEL_UM, sigma2))
        planes = np.zeros((4, h, w), np.float32)
        xs = x_um + (np.arange(w) + 0.5) * p
        ys = y_um + (np.arange(h) + 0.5) * p
        cells = self.specimen.cells[ids]
        small = cells["reach"] < 0.75 * p
        if small.any():
            _splat(planes, x_um, y_um, p, cells[small])
        for rec in cells[~small].tolist():
            _draw_cell(planes, xs, ys, blur, _Cell(*rec))
        mottle = _sample_texture(xs, ys, CYTOPLASM_TEXEL_UM, 0)
        mottle *= CYTOPLASM_MOTTLE * _damping(CYTOPLASM_TEXEL_UM, sigma2)
        mottle += 1.0
        planes[1:] *= mottle

        od = (o.stain_matrix.T @ planes.reshape(4, -1)).reshape(3, h, w)
        np.negative(od, out=od)
        np.exp(od, out=od)
        od *= o.background[:, None, None]
        od += 0.5
        out = od.transpose(1, 2, 0).astype(np.int16, order="C")
        out += _texture_slice(o.noise, ox, oy, w, h)
        np.clip(out, 0, 255, out=out)
        return out.astype(np.uint8)


class _Blur(NamedTuple):
    """Blur and pixel footprint at one resolution, as the drawing loop needs them."""

    edge: float  # contour ramp width, um
    chromatin_damping: float


def _damping(texel_um: float, sigma2: float) -> float:
    """How much a Gaussian blur of variance ``sigma2`` (um^2) shrinks the texture's contrast."""
    corr = TEXTURE_SMOOTH_TEXELS * texel_um
    return corr / math.sqrt(corr * corr + sigma2)


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


def _draw_cell(planes: np.ndarray, xs: np.ndarray, ys: np.ndarray, o: _Blur, c: _Cell) -> None:
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
        tex = _sample_texture(
            xs[j0 + a0 : j0 + a1], ys[i0 + b0 : i0 + b1], CHROMATIN_TEXEL_UM, offset
        )
        tex *= np.float32(granularity)
        tex += 1.0
        tex += rim * np.float32(NUCLEAR_RIM)
        np.maximum(tex, 0.05, out=tex)
        tex *= _coverage(d, edge)
        tex *= np.float32(darkness)
        planes[0, i0 + b0 : i0 + b1, j0 + a0 : j0 + a1] += tex


def _splat(planes: np.ndarray, x0: float, y0: float, p: float, cells: np.ndarray) -> None:
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
