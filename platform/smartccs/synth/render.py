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

This module is the optics and sensor (a center's stain matrix, background, noise) and the
region loop; ``cell_painting`` draws each cell's stain and ``texture`` supplies the grain.
"""

from __future__ import annotations

import functools
import hashlib
import math
import struct

import numpy as np

from smartccs.stain import grey_axis_rotation
from smartccs.synth.cell_painting import (
    CHROMATIN_TEXEL_UM,
    SPREAD,
    Blur,
    CellRecord,
    draw_cell,
    splat_cells,
)
from smartccs.synth.profiles import CenterProfile, StainProfile
from smartccs.synth.specimen import Specimen
from smartccs.synth.texture import damping, sample_texture

NOISE_SIZE = 1024
NOISE_PAD = 512
"""Regions up to NOISE_PAD px on a side take a noise slice; larger ones wrap indices."""

CYTOPLASM_TEXEL_UM = 0.4
CYTOPLASM_MOTTLE = 0.12
"""Grain size (um) and contrast of the mottling that modulates every counterstain."""


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

        blur = Blur(edge, damping(CHROMATIN_TEXEL_UM, sigma2))
        planes = np.zeros((4, h, w), np.float32)
        xs = x_um + (np.arange(w) + 0.5) * p
        ys = y_um + (np.arange(h) + 0.5) * p
        cells = self.specimen.cells[ids]
        small = cells["reach"] < 0.75 * p
        if small.any():
            splat_cells(planes, x_um, y_um, p, cells[small])
        for rec in cells[~small].tolist():
            draw_cell(planes, xs, ys, blur, CellRecord(*rec))
        mottle = sample_texture(xs, ys, CYTOPLASM_TEXEL_UM, 0)
        mottle *= CYTOPLASM_MOTTLE * damping(CYTOPLASM_TEXEL_UM, sigma2)
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
