"""Stain colour geometry shared by the slide synthesizer and the training augmentations.

Two labs' Pap stains differ in how much of each dye binds and in the dyes' hue. In optical
density a hue shift is a rotation about the grey axis: it keeps each pixel's total absorbance,
so glass stays glass. The synthesizer rotates its stain vectors this way to make a center's
profile, and the augmentations rotate tiles the same way so models learn to ignore it.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


def grey_axis_rotation(angle_deg: float) -> np.ndarray:
    """(3, 3) rotation of OD vectors about (1, 1, 1): ``R @ od`` shifts the hue by the angle."""
    k = np.full(3, 1.0 / math.sqrt(3.0))
    theta = math.radians(angle_deg)
    cross = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return (
        math.cos(theta) * np.eye(3)
        + math.sin(theta) * cross
        + (1 - math.cos(theta)) * np.outer(k, k)
    )


# -- a center's stain, measured on its tiles --------------------------------------------------

_GREY = np.full(3, 1.0 / math.sqrt(3.0))
_U = np.array([1.0, -1.0, 0.0]) / math.sqrt(2.0)  # (_U, _V, _GREY) is right-handed, so a
_V = np.array([1.0, 1.0, -2.0]) / math.sqrt(6.0)  # rotation by +a about grey adds a to the hue


class StainStats(BaseModel):
    """What a center's staining and scanner look like, from a sample of its tiles.

    Measured in optical density against the center's own glass, over stained pixels: the hue
    (the axis along which the stains' colours spread about the grey axis, degrees modulo 180:
    the Pap stains lie on both sides of grey, so their plain mean colour is near grey and its
    angle is noise), the density (median absorbance) and the saturation (median colour against
    absorbance). Medians, so that a batch's few dark abnormal nuclei do not move them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    glass: tuple[float, float, float] = Field(description="RGB of bare glass, 0-255")
    hue_deg: float = Field(ge=-90, le=90)
    density: float = Field(gt=0)
    saturation: float = Field(gt=0)
    pixels: int = Field(ge=0, description="stained pixels measured: the weight when merging")


def optical_density(images: np.ndarray, glass: np.ndarray) -> np.ndarray:
    """Absorbance of uint8 RGB pixels against the glass's colour (0 on bare glass)."""
    return np.maximum(-np.log((images.astype(np.float64) + 1) / (glass + 1)), 0.0)


def stain_stats(
    images: np.ndarray, min_density: float = 0.15, max_pixels: int = 400_000
) -> StainStats:
    """Measure the stain of uint8 tiles (N, H, W, 3) (or pixels (..., 3)).

    Raises ValueError when the tiles hold too little stain to measure (blank glass).
    """
    px = np.asarray(images).reshape(-1, 3)
    if len(px) > max_pixels:  # an even subsample: the statistics need no more
        px = px[:: len(px) // max_pixels + 1]
    bright = px.astype(np.int32).sum(1)
    glass = np.median(px[bright >= np.quantile(bright, 0.9)], axis=0).astype(np.float64)
    od = optical_density(px, glass)
    grey = od @ _GREY
    stained = grey > min_density
    if stained.sum() < 100:
        raise ValueError(f"too little stain to measure: {int(stained.sum())} stained pixels")
    od, grey = od[stained], grey[stained]
    chroma = od - grey[:, None] * _GREY
    cu, cv = chroma @ _U, chroma @ _V
    colour = np.hypot(cu, cv)
    axis = np.sum(colour * np.exp(2j * np.arctan2(cv, cu)))  # doubled angles: an axis, not a ray
    return StainStats(
        glass=tuple(float(v) for v in glass),
        hue_deg=math.degrees(float(np.angle(axis))) / 2,
        density=float(np.median(grey)),
        saturation=float(np.median(colour / grey)),
        pixels=int(stained.sum()),
    )


def hue_difference(a: float, b: float) -> float:
    """``a - b`` for hue axes (degrees modulo 180), in [-90, 90)."""
    return (a - b + 90.0) % 180.0 - 90.0


def merge_stats(a: StainStats | None, b: StainStats) -> StainStats:
    """Pixel-weighted mean of two measurements of one center (batch after batch)."""
    if a is None or a.pixels == 0:
        return b
    wb = b.pixels / (a.pixels + b.pixels)
    wa = 1.0 - wb
    return StainStats(
        glass=tuple(wa * x + wb * y for x, y in zip(a.glass, b.glass, strict=True)),
        hue_deg=hue_difference(a.hue_deg + wb * hue_difference(b.hue_deg, a.hue_deg), 0.0),
        density=math.exp(wa * math.log(a.density) + wb * math.log(b.density)),
        saturation=math.exp(wa * math.log(a.saturation) + wb * math.log(b.saturation)),
        pixels=a.pixels + b.pixels,
    )


# -- calibrating a center to the source ------------------------------------------------------


class StainReference(BaseModel):
    """The stain of the centers a model was trained on, one measurement per center.

    Their spread is the range the model has seen: a center inside it is left as it is.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    centers: dict[str, StainStats] = Field(min_length=1)
    floor_hue_deg: float = Field(default=2.0, ge=0, description="least hue tolerance")
    floor_log: float = Field(default=0.03, ge=0, description="least density/saturation/glass")

    def mean(self) -> StainStats:
        merged = None
        for stats in self.centers.values():  # every center weighs the same, whatever its size
            merged = merge_stats(merged, stats.model_copy(update={"pixels": 1}))
        assert merged is not None
        return merged

    def tolerance(self) -> dict[str, float]:
        """How far each quantity may stray from the mean and still be inside the range seen."""
        m = self.mean()
        c = list(self.centers.values())

        def spread(values: list[float], floor: float) -> float:
            return max(floor, max(abs(v) for v in values))

        return {
            "hue_deg": spread(
                [hue_difference(s.hue_deg, m.hue_deg) for s in c], self.floor_hue_deg
            ),
            "density": spread([math.log(s.density / m.density) for s in c], self.floor_log),
            "saturation": spread(
                [math.log(s.saturation / m.saturation) for s in c], self.floor_log
            ),
            "glass": spread(
                [math.log(a / b) for s in c for a, b in zip(s.glass, m.glass, strict=True)],
                self.floor_log,
            ),
        }


class StainCalibration(BaseModel):
    """A map in optical density from one center's stain to the nearest stain the source saw."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hue_deg: float = 0.0
    density_scale: float = 1.0
    saturation_scale: float = 1.0
    glass_in: tuple[float, float, float] = (255.0, 255.0, 255.0)
    glass_out: tuple[float, float, float] = (255.0, 255.0, 255.0)

    @property
    def identity(self) -> bool:
        return (
            self.hue_deg == 0
            and self.density_scale == 1
            and self.saturation_scale == 1
            and self.glass_in == self.glass_out
        )

    def matrix(self) -> np.ndarray:
        """(3, 3): OD -> calibrated OD."""
        grey = np.outer(_GREY, _GREY)
        colour = self.saturation_scale * grey_axis_rotation(self.hue_deg) @ (np.eye(3) - grey)
        return self.density_scale * (grey + colour)


def _shrink(x: float, tol: float) -> float:
    """Only what lies beyond the tolerance: 0 inside the range seen, continuous at its edge."""
    return math.copysign(max(0.0, abs(x) - tol), x)


def calibration(reference: StainReference, target: StainStats) -> StainCalibration:
    """The correction that brings ``target`` to the edge of the source's range (none inside)."""
    m, tol = reference.mean(), reference.tolerance()
    glass_out = tuple(
        g * math.exp(_shrink(math.log(r / g), tol["glass"]))
        for g, r in zip(target.glass, m.glass, strict=True)
    )
    return StainCalibration(
        hue_deg=_shrink(hue_difference(m.hue_deg, target.hue_deg), tol["hue_deg"]),
        density_scale=math.exp(_shrink(math.log(m.density / target.density), tol["density"])),
        saturation_scale=math.exp(
            _shrink(math.log(m.saturation / target.saturation), tol["saturation"])
        ),
        glass_in=target.glass,
        glass_out=glass_out,
    )


def calibrate(images: np.ndarray, cal: StainCalibration) -> np.ndarray:
    """uint8 RGB tiles (..., 3) as the source's stain would show them; as they are if identity."""
    if cal.identity:
        return images
    od = optical_density(images, np.asarray(cal.glass_in)) @ cal.matrix().T
    out = (np.asarray(cal.glass_out) + 1) * np.exp(-np.maximum(od, 0.0)) - 1
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
