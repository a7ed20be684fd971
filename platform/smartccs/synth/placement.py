"""Where a kind's cells go on the slide: singly, in loose groups, or in honeycomb sheets.

Grouping is part of the cytology (overlapping squamous sheets, neutrophil clumps, syncytial HSIL
groups, glandular honeycombs), so each kind's grouping lives here beside the code that places
cells by it; the cells themselves are drawn by ``cell_drawing``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from smartccs.synth.cell_drawing import draw_cells
from smartccs.synth.cell_table import CELL_DTYPE
from smartccs.synth.prep_area import PrepArea


@dataclass(frozen=True)
class Grouping:
    """How a kind clusters: the fraction of its cells in groups, group sizes and spread."""

    fraction: float
    size: tuple[int, int]
    spread_um: float


GROUPING: dict[str, Grouping] = {
    "superficial": Grouping(0.25, (3, 10), 16.0),  # overlapping sheets
    "intermediate": Grouping(0.25, (3, 10), 15.0),
    "parabasal": Grouping(0.3, (3, 8), 9.0),
    "inflammatory": Grouping(0.5, (4, 15), 7.0),  # neutrophil clumps
    "HSIL": Grouping(0.6, (4, 14), 9.0),  # loose syncytial-like groups
    "AGC": Grouping(1.0, (12, 40), 0.0),  # honeycomb clusters (see _honeycombs)
}


class GroupCounter:
    """Hands out slide-unique group ids."""

    def __init__(self) -> None:
        self.next = 0

    def take(self, n: int) -> np.ndarray:
        ids = np.arange(self.next, self.next + n, dtype=np.int32)
        self.next += n
        return ids


def place_kind(
    rng: np.random.Generator, kind: str, n: int, area: PrepArea, groups: GroupCounter
) -> np.ndarray:
    """``n`` cells of ``kind``: some single, some in that kind's groups."""
    if n <= 0:
        return np.zeros(0, CELL_DTYPE)
    g = GROUPING.get(kind)
    n_grouped = round(n * g.fraction) if g else 0
    if kind == "AGC":
        return _honeycombs(rng, n, area, groups)
    parts = [draw_cells(rng, kind, area.sample(rng, n - n_grouped))]
    if n_grouped and g:
        sizes = _split(rng, n_grouped, g.size)
        centres = area.sample(rng, len(sizes))
        ids = np.repeat(groups.take(len(sizes)), sizes)
        xy = np.repeat(centres, sizes, axis=0) + rng.normal(0, g.spread_um, (n_grouped, 2))
        parts.append(draw_cells(rng, kind, xy, ids))
    return np.concatenate(parts)


def _split(rng: np.random.Generator, n: int, size: tuple[int, int]) -> np.ndarray:
    """Group sizes in ``size`` summing to ``n`` (the last may be smaller)."""
    sizes: list[int] = []
    while n > 0:
        s = min(n, int(rng.integers(size[0], size[1] + 1)))
        sizes.append(s)
        n -= s
    return np.array(sizes, dtype=np.int64)


def _honeycombs(
    rng: np.random.Generator, n: int, area: PrepArea, groups: GroupCounter
) -> np.ndarray:
    """AGC: crowded sheets on a jittered hexagonal grid; edge cells columnar and radial.

    Seen en face the interior is a crowded honeycomb; at the edges the cells lie on their side
    (columnar, nucleus towards the edge), the "feathering" of glandular neoplasia.
    """
    sizes = _split(rng, n, GROUPING["AGC"].size)
    centres = area.sample(rng, len(sizes))
    ids = groups.take(len(sizes))
    out = []
    for size, centre, gid in zip(sizes, centres, ids, strict=True):
        spacing = rng.uniform(8.0, 10.0)
        k = math.ceil(math.sqrt(size)) + 3
        i, j = np.meshgrid(np.arange(-k, k + 1), np.arange(-k, k + 1))
        grid = np.stack([(i + 0.5 * (j % 2)) * spacing, j * spacing * math.sqrt(3) / 2], -1)
        grid = grid.reshape(-1, 2)
        stretch = np.array([1.0, rng.uniform(0.55, 1.0)])  # an elongated sheet
        rot = rng.uniform(0, np.pi)
        rmat = np.array([[math.cos(rot), -math.sin(rot)], [math.sin(rot), math.cos(rot)]])
        dist = np.linalg.norm(grid / stretch, axis=1) + rng.uniform(0, spacing, len(grid))
        pts = grid[np.argsort(dist, kind="stable")[:size]] @ rmat.T
        pts += rng.normal(0, spacing * 0.12, pts.shape)
        cells = draw_cells(rng, "AGC", pts + centre, np.full(size, gid))
        rel = pts - pts.mean(0)
        radial = np.linalg.norm(rel, axis=1)
        edge = radial >= np.quantile(radial, 0.6) if size > 4 else np.zeros(size, bool)
        outward = np.arctan2(rel[:, 1], rel[:, 0])
        e = int(edge.sum())
        cells["aspect"][edge] = np.sqrt(rng.uniform(1.8, 2.8, e))
        cells["theta"][edge] = outward[edge]
        cells["nuc_theta"][edge] = outward[edge]
        shift = cells["radius"][edge] * cells["aspect"][edge] * 0.45
        cells["nuc_dx"][edge] = shift * np.cos(outward[edge])
        cells["nuc_dy"][edge] = shift * np.sin(outward[edge])
        out.append(cells)
    return np.concatenate(out)
