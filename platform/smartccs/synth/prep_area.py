"""Where on the glass cells are deposited, and how densely: a ThinPrep-like ellipse.

Placement samples cell and group centres from this area; its slow density waves make some
fields crowded and others sparse, as on a real preparation, and its corners empty glass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PrepArea:
    """The deposited cell area (a ThinPrep-like ellipse) with low-frequency density variation."""

    cx: float
    cy: float
    ax: float
    ay: float
    waves: np.ndarray  # (3, 4): kx, ky, phase, amplitude

    @classmethod
    def draw(cls, rng: np.random.Generator, width: float, height: float) -> PrepArea:
        wavelength = rng.uniform(800.0, 6000.0, 3)
        direction = rng.uniform(0, np.pi, 3)
        k = 2 * np.pi / wavelength
        waves = np.stack(
            [
                k * np.cos(direction),
                k * np.sin(direction),
                rng.uniform(0, 2 * np.pi, 3),
                rng.uniform(0.1, 0.3, 3),
            ],
            axis=1,
        )
        return cls(
            cx=width * rng.uniform(0.48, 0.52),
            cy=height * rng.uniform(0.48, 0.52),
            ax=width * rng.uniform(0.44, 0.47),
            ay=height * rng.uniform(0.44, 0.47),
            waves=waves,
        )

    @classmethod
    def disc(cls, cx: float, cy: float, radius: float) -> PrepArea:
        """A uniform disc: for placing a few cells by hand (galleries, tests)."""
        return cls(cx, cy, radius, radius, np.zeros((0, 4)))

    @property
    def area_mm2(self) -> float:
        return math.pi * self.ax * self.ay * 1e-6

    def _density(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        w = self.waves
        f = 1.0 + np.sum(w[:, 3] * np.cos(np.outer(x, w[:, 0]) + np.outer(y, w[:, 1]) + w[:, 2]), 1)
        ax2, ay2 = self.ax**2, self.ay**2  # no division: a zero-radius disc is a point
        inside = (x - self.cx) ** 2 * ay2 + (y - self.cy) ** 2 * ax2 <= ax2 * ay2
        return np.where(inside, f, 0.0)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` points drawn from the density (rejection sampling, vectorised)."""
        fmax = 1.0 + float(self.waves[:, 3].sum())
        out: list[np.ndarray] = []
        have = 0
        while have < n:
            m = max(64, int((n - have) * 1.5 * fmax / 0.75))
            x = rng.uniform(self.cx - self.ax, self.cx + self.ax, m)
            y = rng.uniform(self.cy - self.ay, self.cy + self.ay, m)
            keep = rng.uniform(0, fmax, m) < self._density(x, y)
            pts = np.stack([x[keep], y[keep]], axis=1)[: n - have]
            out.append(pts)
            have += len(pts)
        return np.concatenate(out) if out else np.empty((0, 2))
