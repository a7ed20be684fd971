"""One smooth periodic noise texture, sampled in microns, for chromatin and cytoplasm grain.

Texture is looked up at physical positions, so a region has the same grain at any pixel size;
``damping`` says how much a focus blur of a given width flattens it, which is how the renderer
blurs texture without a convolution pass.
"""

from __future__ import annotations

import functools
import math

import numpy as np

TEXTURE_SIZE = 512
TEXTURE_SMOOTH_TEXELS = 3.0
"""Correlation length of the texture in texels: granules span several pixels, not one."""


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


def sample_texture(xs: np.ndarray, ys: np.ndarray, texel_um: float, offset: int) -> np.ndarray:
    """The texture at physical positions (nearest texel), so it is the same at any mpp."""
    ix = (np.floor(xs / texel_um).astype(np.int64) + offset) % TEXTURE_SIZE
    iy = (np.floor(ys / texel_um).astype(np.int64) + offset * 7) % TEXTURE_SIZE
    return np.take(np.take(_texture(), iy, axis=0), ix, axis=1)


def damping(texel_um: float, sigma2: float) -> float:
    """How much a Gaussian blur of variance ``sigma2`` (um^2) shrinks the texture's contrast."""
    corr = TEXTURE_SMOOTH_TEXELS * texel_um
    return corr / math.sqrt(corr * corr + sigma2)
