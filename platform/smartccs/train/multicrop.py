"""Multi-crop views of cytology tiles for self-distillation, as torch ops on the tiles' device.

DINO learns what stays the same across views, so the views must differ in what should not
matter for screening: where in the tile, orientation (cells have no up), and above all the
staining and scanning of the center. Stain jitter therefore works in optical-density space on
the haematoxylin/eosin/DAB stain axes (Ruifrok & Johnston), scaling and shifting each stain's
amount the way two labs' Pap stains differ, rather than as a hue shift in RGB.
All randomness comes from one CPU ``torch.Generator``, so a seed fixes every view's draws
wherever the pixels live; on a GPU the views are cut there, since on CPU they were 80% of a
ViT-L step's time on an H200 (docs/benchmarks.md).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from smartccs.models.artifacts import Normalization
from smartccs.stain import grey_axis_rotation

_RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64
)
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


class MultiCropConfig(BaseModel):
    """How the 2 global and N local views of a tile are cut and perturbed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    global_size: int = Field(default=96, ge=16, description="side of a global view (img_size)")
    local_size: int = Field(default=48, ge=8, description="side of a local view")
    n_local: int = Field(default=4, ge=0, description="local views per tile")
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    crop_tries: int = Field(
        default=1,
        ge=1,
        description="candidate regions per view; the one holding the most stain is kept, so "
        "views land on cells rather than bare glass (1 = plain random crop)",
    )
    stain_sigma: float = Field(default=0.1, ge=0, description="per-stain scale jitter, ±")
    stain_bias: float = Field(default=0.05, ge=0, description="per-stain OD offset jitter, ±")
    hue_deg: float = Field(
        default=0.0,
        ge=0,
        le=180,
        description="stain hue turn about the grey axis, ± degrees (0 = off): views of one tile "
        "then differ in hue as two centers' stains do, so hue cannot tell tiles apart",
    )
    global_blur_p: tuple[float, float] = (1.0, 0.1)
    local_blur_p: float = Field(default=0.5, ge=0, le=1)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    brightness: float = Field(default=0.2, ge=0, lt=1)
    contrast: float = Field(default=0.2, ge=0, lt=1)
    color_p: float = Field(default=0.8, ge=0, le=1, description="chance of stain + intensity")
    normalization: Normalization | Literal["auto"] = Field(
        default="auto",
        description="input mean/std; 'auto' = estimated from the run's own tiles at job start "
        "(smartccs.train.normalization), which cytology needs: ImageNet's collapse it",
    )

    @property
    def n_crops(self) -> int:
        return 2 + self.n_local


def _uniform(g: torch.Generator, lo: float, hi: float, n: int = 1) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def random_resized_crop(
    img: torch.Tensor,
    size: int,
    scale: tuple[float, float],
    g: torch.Generator,
    tries: int = 1,
) -> torch.Tensor:
    """A random region of ``scale`` x the area, aspect 3:4 to 4:3, resized to ``size``².

    With ``tries`` > 1, that many regions are drawn and the darkest (most stain) is kept.
    """
    _, h, w = img.shape
    best, best_ink = (0, 0, w, h), -1.0
    for _ in range(tries):
        area = float(_uniform(g, *scale)) * h * w
        ratio = math.exp(float(_uniform(g, math.log(3 / 4), math.log(4 / 3))))
        cw = max(1, min(w, round(math.sqrt(area * ratio))))
        ch = max(1, min(h, round(math.sqrt(area / ratio))))
        x0 = int(torch.randint(0, w - cw + 1, (1,), generator=g))
        y0 = int(torch.randint(0, h - ch + 1, (1,), generator=g))
        ink = 1.0 - float(img[:, y0 : y0 + ch, x0 : x0 + cw].mean()) if tries > 1 else 0.0
        if ink > best_ink:
            best, best_ink = (x0, y0, cw, ch), ink
    x0, y0, cw, ch = best
    crop = img[:, y0 : y0 + ch, x0 : x0 + cw].unsqueeze(0)
    out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)
    return out.squeeze(0).clamp_(0, 1)


def flip_rotate(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One of the 8 symmetries of the square: cells on glass have no orientation."""
    k = int(torch.randint(0, 4, (1,), generator=g))
    if bool(torch.rand(1, generator=g) < 0.5):
        img = img.flip(-1)
    return torch.rot90(img, k, dims=(-2, -1))


def stain_jitter(
    img: torch.Tensor, g: torch.Generator, sigma: float, bias: float, hue_deg: float = 0.0
) -> torch.Tensor:
    """Scale and shift each stain's optical density, as a different center's staining would.

    ``hue_deg`` > 0 also rotates the result's OD about the grey axis by up to that angle: a
    lab whose dyes differ in hue, not only in amount (``smartccs.stain``).
    """
    alpha = _uniform(g, 1 - sigma, 1 + sigma, 3)
    beta = _uniform(g, -bias, bias, 3)
    # OD' = ((OD @ HED_FROM_RGB) * alpha + beta) @ RGB_FROM_HED, folded into one affine map
    m = (_HED_FROM_RGB * alpha) @ _RGB_FROM_HED
    b = beta @ _RGB_FROM_HED
    if hue_deg > 0:  # drawn only when asked, so runs without it keep their random stream
        turn = torch.from_numpy(grey_axis_rotation(float(_uniform(g, -hue_deg, hue_deg))))
        m, b = m @ turn.T, b @ turn.T
    m, b = m.to(img.device), b.to(img.device)
    od = -torch.log((img.to(torch.float64) * 255 + 1) / 256)
    od = torch.einsum("chw,cd->dhw", od, m) + b[:, None, None]
    out = (256 * torch.exp(-od.clamp(min=0)) - 1) / 255
    return out.clamp_(0, 1).to(img.dtype)


def gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, as a slightly defocused scan."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=img.dtype, device=img.device)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    c = img.shape[0]
    out = F.pad(img.unsqueeze(0), (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return out.squeeze(0)


def brightness_contrast(
    img: torch.Tensor, g: torch.Generator, brightness: float, contrast: float
) -> torch.Tensor:
    """Scanner exposure and contrast differences."""
    b = float(_uniform(g, 1 - brightness, 1 + brightness))
    c = float(_uniform(g, 1 - contrast, 1 + contrast))
    mean = img.mean()
    return ((img * b - mean * b) * c + mean * b).clamp_(0, 1)


def _view(
    img: torch.Tensor,
    size: int,
    scale: tuple[float, float],
    blur_p: float,
    cfg: MultiCropConfig,
    g: torch.Generator,
) -> torch.Tensor:
    out = flip_rotate(random_resized_crop(img, size, scale, g, cfg.crop_tries), g)
    if bool(torch.rand(1, generator=g) < cfg.color_p):
        out = stain_jitter(out, g, cfg.stain_sigma, cfg.stain_bias, cfg.hue_deg)
        out = brightness_contrast(out, g, cfg.brightness, cfg.contrast)
    if bool(torch.rand(1, generator=g) < blur_p):
        out = gaussian_blur(out, float(_uniform(g, *cfg.blur_sigma)))
    return out


def multi_crop(
    images: torch.Tensor | np.ndarray, cfg: MultiCropConfig, g: torch.Generator
) -> list[torch.Tensor]:
    """uint8 tiles (B, H, W, 3) -> 2 global then ``n_local`` local views, each (B, 3, s, s).

    Views are float32, normalized with ``cfg.normalization``, ready for the encoder, and on
    the device the tiles are on.
    """
    if cfg.normalization == "auto":
        raise ValueError("normalization 'auto' must be resolved from the tiles before cropping")
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 tiles (B, H, W, 3), got {images.dtype} {images.shape}")
    tiles = images.permute(0, 3, 1, 2).to(torch.float32) / 255
    specs = [(cfg.global_size, cfg.global_scale, p) for p in cfg.global_blur_p]
    specs += [(cfg.local_size, cfg.local_scale, cfg.local_blur_p)] * cfg.n_local
    mean = torch.tensor(cfg.normalization.mean, device=tiles.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.normalization.std, device=tiles.device).view(1, 3, 1, 1)
    views = []
    for size, scale, blur_p in specs:
        batch = torch.stack([_view(t, size, scale, blur_p, cfg, g) for t in tiles])
        views.append((batch - mean) / std)
    return views
