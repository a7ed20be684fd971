"""Multi-crop views of cytology tiles for self-distillation, as torch ops on the tiles' device.

DINO learns what stays the same across views, so the views must differ in what should not
matter for screening: where in the tile, orientation (cells have no up), and above all the
staining and scanning of the center. Stain jitter therefore works in optical-density space on
the haematoxylin/eosin/DAB stain axes (Ruifrok & Johnston), scaling and shifting each stain's
amount the way two labs' Pap stains differ, rather than as a hue shift in RGB.

All randomness comes from one CPU ``torch.Generator``, drawn tile by tile, so a seed fixes
every view's draws wherever the pixels live. The pixel work is done a whole view of the batch
at a time (one crop-and-resize per tile, every other step once per view): cut tile by tile, the
views were 48-80% of a ViT-L step on an H200, as thousands of small kernels
(docs/benchmarks.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
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

Box = tuple[int, int, int, int]
"""A crop region: x0, y0, width, height in pixels."""


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


# -- draws: CPU, one tile at a time, so a seed gives the same views on any device ---------


def _uniform(g: torch.Generator, lo: float, hi: float, n: int = 1) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def draw_boxes(
    g: torch.Generator, h: int, w: int, scale: tuple[float, float], tries: int = 1
) -> list[Box]:
    """``tries`` random regions of ``scale`` x the area, aspect 3:4 to 4:3."""
    boxes = []
    for _ in range(tries):
        area = float(_uniform(g, *scale)) * h * w
        ratio = math.exp(float(_uniform(g, math.log(3 / 4), math.log(4 / 3))))
        cw = max(1, min(w, round(math.sqrt(area * ratio))))
        ch = max(1, min(h, round(math.sqrt(area / ratio))))
        x0 = int(torch.randint(0, w - cw + 1, (1,), generator=g))
        y0 = int(torch.randint(0, h - ch + 1, (1,), generator=g))
        boxes.append((x0, y0, cw, ch))
    return boxes


def draw_symmetry(g: torch.Generator) -> tuple[int, bool]:
    """Quarter turns and whether to mirror first: one of the square's 8 symmetries."""
    k = int(torch.randint(0, 4, (1,), generator=g))
    return k, bool(torch.rand(1, generator=g) < 0.5)


def draw_stain(
    g: torch.Generator, sigma: float, bias: float, hue_deg: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine map (3x3, 3) of optical density that one draw of stain jitter applies."""
    alpha = _uniform(g, 1 - sigma, 1 + sigma, 3)
    beta = _uniform(g, -bias, bias, 3)
    # OD' = ((OD @ HED_FROM_RGB) * alpha + beta) @ RGB_FROM_HED, folded into one affine map
    m = (_HED_FROM_RGB * alpha) @ _RGB_FROM_HED
    b = beta @ _RGB_FROM_HED
    if hue_deg > 0:  # drawn only when asked, so runs without it keep their random stream
        turn = torch.from_numpy(grey_axis_rotation(float(_uniform(g, -hue_deg, hue_deg))))
        m, b = m @ turn.T, b @ turn.T
    return m, b


def draw_exposure(g: torch.Generator, brightness: float, contrast: float) -> tuple[float, float]:
    """Brightness and contrast factors of one draw."""
    return (
        float(_uniform(g, 1 - brightness, 1 + brightness)),
        float(_uniform(g, 1 - contrast, 1 + contrast)),
    )


# -- pixel ops: a batch (N, C, H, W) at once, each image with its own draw -----------------


def stain_integral(tiles: torch.Tensor) -> torch.Tensor:
    """Summed-area table (N, H+1, W+1) of each tile's channel-mean pixel, in float64: any
    region's mean brightness from four lookups, however many regions are asked."""
    return F.pad(tiles.mean(1, dtype=torch.float64).cumsum(1).cumsum(2), (1, 0, 1, 0))


def pick_inkiest(integral: torch.Tensor, candidates: Sequence[Sequence[Box]]) -> list[Box]:
    """Per tile, the candidate region with the most stain (lowest mean); the first on an exact
    tie (regions of the same content can differ in the last bits of their sums, as they did
    in the per-region float32 means before).

    ``integral`` is the tiles' ``stain_integral``, so all candidates cost one gather and one
    device sync.
    """
    box = torch.tensor(candidates, dtype=torch.int64).to(integral.device)  # (N, T, 4)
    x0, y0, cw, ch = box.unbind(-1)
    x1, y1 = x0 + cw, y0 + ch
    rows = torch.arange(len(box), device=integral.device)[:, None]
    ii = integral
    total = ii[rows, y1, x1] - ii[rows, y0, x1] - ii[rows, y1, x0] + ii[rows, y0, x0]
    best = (total / (cw * ch)).argmin(1).tolist()
    return [cands[i] for cands, i in zip(candidates, best, strict=True)]


def resize_crops(tiles: torch.Tensor, boxes: Sequence[Box], size: int) -> torch.Tensor:
    """Each tile's region resized (bilinear, antialiased) to ``size``², in [0, 1]."""
    out = [
        F.interpolate(
            t[None, :, y0 : y0 + ch, x0 : x0 + cw], size=(size, size), mode="bilinear",
            antialias=True,
        )
        for t, (x0, y0, cw, ch) in zip(tiles, boxes, strict=True)
    ]  # fmt: skip
    return torch.cat(out).clamp_(0, 1)


def apply_symmetries(imgs: torch.Tensor, ks: Sequence[int], flips: Sequence[bool]) -> torch.Tensor:
    """Mirror (left-right) where asked, then turn by k x 90°; one op per symmetry present."""
    out = torch.empty_like(imgs)
    for k, flip in sorted(set(zip(ks, flips, strict=True))):
        picked = [i for i, kf in enumerate(zip(ks, flips, strict=True)) if kf == (k, flip)]
        idx = torch.tensor(picked, device=imgs.device)
        part = imgs.index_select(0, idx)
        out[idx] = torch.rot90(part.flip(-1) if flip else part, k, dims=(-2, -1))
    return out


def apply_stain(imgs: torch.Tensor, m: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Each RGB image's optical density through its own affine map (``draw_stain``)."""
    m, b = m.to(imgs.device), b.to(imgs.device)
    od = -torch.log((imgs.to(torch.float64) * 255 + 1) / 256)
    od = torch.einsum("nchw,ncd->ndhw", od, m) + b[:, :, None, None]
    out = (256 * torch.exp(-od.clamp(min=0)) - 1) / 255
    return out.clamp_(0, 1).to(imgs.dtype)


def apply_exposure(
    imgs: torch.Tensor, brightness: Sequence[float], contrast: Sequence[float]
) -> torch.Tensor:
    """Scale each image's brightness, and its contrast about its own mean."""
    b = torch.tensor(brightness, dtype=imgs.dtype).to(imgs.device).view(-1, 1, 1, 1)
    c = torch.tensor(contrast, dtype=imgs.dtype).to(imgs.device).view(-1, 1, 1, 1)
    mean = imgs.mean(dim=(1, 2, 3), keepdim=True)
    return ((imgs * b - mean * b) * c + mean * b).clamp_(0, 1)


def apply_blur(imgs: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur, each image with its own sigma, as a slightly defocused scan.

    Kernels are zero-padded to the widest radius, so one grouped convolution serves all.
    """
    radii = [max(1, math.ceil(3 * s)) for s in sigmas]
    r_max = max(radii)
    kernels = []
    for sigma, r in zip(sigmas, radii, strict=True):
        x = torch.arange(-r, r + 1, dtype=imgs.dtype)
        k = torch.exp(-(x**2) / (2 * sigma**2))
        kernels.append(F.pad(k / k.sum(), (r_max - r, r_max - r)))
    n, c, h, w = imgs.shape
    k = torch.stack(kernels).to(imgs.device).repeat_interleave(c, dim=0)  # (N*C, 2R+1)
    out = F.pad(imgs, (r_max,) * 4, mode="reflect").reshape(1, n * c, h + 2 * r_max, -1)
    out = F.conv2d(out, k.view(n * c, 1, 1, -1), groups=n * c)
    out = F.conv2d(out, k.view(n * c, 1, -1, 1), groups=n * c)
    return out.view(n, c, h, w)


# -- one image at a time: the draw, then the batch op on a batch of one ---------------------


def random_resized_crop(
    img: torch.Tensor, size: int, scale: tuple[float, float], g: torch.Generator, tries: int = 1
) -> torch.Tensor:
    """A random region of ``scale`` x the area, aspect 3:4 to 4:3, resized to ``size``².

    With ``tries`` > 1, that many regions are drawn and the darkest (most stain) is kept.
    """
    _, h, w = img.shape
    boxes = draw_boxes(g, h, w, scale, tries)
    box = pick_inkiest(stain_integral(img[None]), [boxes])[0] if tries > 1 else boxes[0]
    return resize_crops(img[None], [box], size)[0]


def flip_rotate(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One of the 8 symmetries of the square: cells on glass have no orientation."""
    k, flip = draw_symmetry(g)
    return apply_symmetries(img[None], [k], [flip])[0]


def stain_jitter(
    img: torch.Tensor, g: torch.Generator, sigma: float, bias: float, hue_deg: float = 0.0
) -> torch.Tensor:
    """Scale and shift each stain's optical density, as a different center's staining would.

    ``hue_deg`` > 0 also rotates the result's OD about the grey axis by up to that angle: a
    lab whose dyes differ in hue, not only in amount (``smartccs.stain``).
    """
    m, b = draw_stain(g, sigma, bias, hue_deg)
    return apply_stain(img[None], m[None], b[None])[0]


def gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, as a slightly defocused scan."""
    return apply_blur(img[None], [sigma])[0]


def brightness_contrast(
    img: torch.Tensor, g: torch.Generator, brightness: float, contrast: float
) -> torch.Tensor:
    """Scanner exposure and contrast differences."""
    b, c = draw_exposure(g, brightness, contrast)
    return apply_exposure(img[None], [b], [c])[0]


# -- multi-crop -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _ViewDraw:
    """Everything random about one tile's view."""

    candidates: list[Box]
    k: int
    flip: bool
    stain: tuple[torch.Tensor, torch.Tensor] | None
    exposure: tuple[float, float] | None
    blur_sigma: float | None


def _draw_view(g: torch.Generator, h: int, w: int, scale: tuple[float, float], blur_p: float,
               cfg: MultiCropConfig) -> _ViewDraw:  # fmt: skip
    candidates = draw_boxes(g, h, w, scale, cfg.crop_tries)
    k, flip = draw_symmetry(g)
    stain = exposure = sigma = None
    if bool(torch.rand(1, generator=g) < cfg.color_p):
        stain = draw_stain(g, cfg.stain_sigma, cfg.stain_bias, cfg.hue_deg)
        exposure = draw_exposure(g, cfg.brightness, cfg.contrast)
    if bool(torch.rand(1, generator=g) < blur_p):
        sigma = float(_uniform(g, *cfg.blur_sigma))
    return _ViewDraw(candidates, k, flip, stain, exposure, sigma)


def _views(tiles: torch.Tensor, integral: torch.Tensor | None, size: int,
           scale: tuple[float, float], blur_p: float, cfg: MultiCropConfig,
           g: torch.Generator) -> torch.Tensor:  # fmt: skip
    """One view of every tile: crop, symmetry, then stain and exposure, then blur.

    ``integral``: the tiles' ``stain_integral`` when each view has several candidate regions.
    """
    _, _, h, w = tiles.shape
    draws = [_draw_view(g, h, w, scale, blur_p, cfg) for _ in range(len(tiles))]
    if integral is None:
        boxes = [d.candidates[0] for d in draws]
    else:
        boxes = pick_inkiest(integral, [d.candidates for d in draws])
    out = resize_crops(tiles, boxes, size)
    out = apply_symmetries(out, [d.k for d in draws], [d.flip for d in draws])
    coloured = [(i, d) for i, d in enumerate(draws) if d.stain is not None]
    if coloured:
        idx = torch.tensor([i for i, _ in coloured], device=out.device)
        m = torch.stack([d.stain[0] for _, d in coloured])
        b = torch.stack([d.stain[1] for _, d in coloured])
        part = apply_stain(out.index_select(0, idx), m, b)
        exposure = [d.exposure for _, d in coloured]
        out[idx] = apply_exposure(part, [e[0] for e in exposure], [e[1] for e in exposure])
    blurred = [(i, d.blur_sigma) for i, d in enumerate(draws) if d.blur_sigma is not None]
    if blurred:
        idx = torch.tensor([i for i, _ in blurred], device=out.device)
        out[idx] = apply_blur(out.index_select(0, idx), [s for _, s in blurred])
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
    integral = stain_integral(tiles) if cfg.crop_tries > 1 else None  # one for all views
    specs = [(cfg.global_size, cfg.global_scale, p) for p in cfg.global_blur_p]
    specs += [(cfg.local_size, cfg.local_scale, cfg.local_blur_p)] * cfg.n_local
    mean = torch.tensor(cfg.normalization.mean, device=tiles.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.normalization.std, device=tiles.device).view(1, 3, 1, 1)
    return [
        (_views(tiles, integral, size, scale, blur_p, cfg, g) - mean) / std
        for size, scale, blur_p in specs
    ]
