"""The physical scene of one synthetic Pap slide: cells in microns, before any scanner sees it.

A specimen is drawn once per slide and rendered at any resolution, so two scans of one
specimen (say 0.25 and 0.5 um/px) show the same cells at the same places; that is what lets
tests check the physical tile grid. Cells are one structured numpy array (about 200 bytes a
cell, ~10^5 cells on a 20 mm slide) plus a grid index, so the scene is the only per-slide state
and a region query touches only nearby cells.

Morphology follows The Bethesda System: normal squamous cells (superficial, intermediate,
parabasal), inflammatory cells, debris and overlapping sheets, and the six abnormal classes with
their hallmarks (nuclear enlargement, hyperchromasia, irregular contours, rising N/C ratio,
koilocytic halos, keratinised bizarre shapes, crowded glandular groups).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from smartccs.errors import CCSError
from smartccs.synth.profiles import CenterProfile
from smartccs.taxonomy import ABNORMAL_CLASSES, SEVERITY, slide_grade

NORMAL_KINDS: tuple[str, ...] = (
    "superficial",
    "intermediate",
    "parabasal",
    "inflammatory",
    "debris",
)
"""Normal content of a NILM smear (ground-truth classes that are not findings)."""

CELL_KINDS: tuple[str, ...] = (*NORMAL_KINDS, *ABNORMAL_CLASSES)
"""Every ground-truth class, in code order (``Specimen.cells['kind']`` indexes this)."""

KIND_CODE: dict[str, int] = {k: i for i, k in enumerate(CELL_KINDS)}

HARMONICS = 6
"""Fourier harmonics of a contour: enough for lobes, polygons and irregular membranes."""

CELL_DTYPE = np.dtype(
    [
        ("kind", "i1"),  # index into CELL_KINDS
        ("group", "i4"),  # sheet / cluster id, -1 for a single cell
        ("x", "f8"),  # centre, um
        ("y", "f8"),
        ("radius", "f4"),  # mean cytoplasm radius, um
        ("aspect", "f4"),  # sqrt(major/minor): axes are radius*aspect and radius/aspect
        ("theta", "f4"),  # rotation, radians
        ("shape", "f4", (HARMONICS, 2)),  # relative contour harmonics k=1..K (cos, sin)
        ("tail", "f4"),  # tadpole tail length along the long axis (normalised um), 0 = none
        ("tail_dir", "f4"),  # 0 or pi: which end of the long axis carries the tail
        ("density", "f4"),  # cytoplasm stain concentration (OD units)
        ("stain", "f4", (3,)),  # cytoplasm weights of eosin, light green, orange G
        ("nuc_dx", "f4"),  # nucleus centre offset from the cell centre, um
        ("nuc_dy", "f4"),
        ("nuc_radius", "f4"),  # 0 = anucleate (debris)
        ("nuc_aspect", "f4"),
        ("nuc_theta", "f4"),
        ("nuc_shape", "f4", (HARMONICS, 2)),
        ("nuc_darkness", "f4"),  # hematoxylin concentration (OD units)
        ("chromatin", "f4"),  # granularity: amplitude of the chromatin texture
        ("halo", "f4"),  # koilocytic halo radius / nucleus radius, 0 = none
        ("binucleate", "?"),
        ("nuc2_dx", "f4"),  # second nucleus offset, when binucleate
        ("nuc2_dy", "f4"),
        ("reach", "f4"),  # conservative radius around (x, y) holding everything drawn
        ("box", "f8", (4,)),  # tight x0, y0, x1, y1 of the cell, um (ground truth)
    ]
)

Range = tuple[float, float]


@dataclass(frozen=True)
class Morphology:
    """Ranges one cell kind's parameters are drawn from (um and OD units)."""

    radius: Range  # mean cytoplasm radius
    elongation: Range  # major / minor axis ratio
    irregularity: float  # contour harmonic amplitude
    density: Range  # cytoplasm stain concentration
    eosin: Range
    light_green: Range
    orange: Range
    nucleus: Range  # nucleus radius in um (ignored when nc is set)
    nucleus_elongation: Range
    nucleus_irregularity: Range
    darkness: Range  # hematoxylin concentration
    chromatin: Range
    nc: Range | None = None  # nucleus radius / cell radius, for the high-N/C classes
    offset: float = 0.2  # how far off-centre the nucleus may sit, fraction of radius
    lobes: int = 0  # segmented nuclei (neutrophils): harmonic carrying the lobes
    halo: Range = (0.0, 0.0)  # koilocytic halo, multiple of the nucleus radius
    binucleate: float = 0.0  # probability of a second nucleus
    tail: float = 0.0  # probability of a tadpole tail
    tail_length: Range = (0.0, 0.0)  # multiple of the radius


MORPHOLOGY: dict[str, Morphology] = {
    # Mature squamous cells: large flat polygonal cells, pyknotic nucleus, eosinophilic.
    "superficial": Morphology(
        radius=(19, 25),
        elongation=(1.0, 1.6),
        irregularity=0.1,
        density=(0.30, 0.45),
        eosin=(0.45, 0.75),
        light_green=(0.0, 0.1),
        orange=(0.3, 0.6),
        nucleus=(1.9, 2.6),
        nucleus_elongation=(1.0, 1.2),
        nucleus_irregularity=(0.01, 0.03),
        darkness=(1.7, 2.2),
        chromatin=(0.05, 0.15),
    ),
    # The reference cell: intermediate nucleus (~35 um^2) is the yardstick of ASC-US/LSIL.
    "intermediate": Morphology(
        radius=(16, 23),
        elongation=(1.0, 1.6),
        irregularity=0.1,
        density=(0.30, 0.45),
        eosin=(0.0, 0.15),
        light_green=(0.75, 1.0),
        orange=(0.0, 0.05),
        nucleus=(3.0, 3.6),
        nucleus_elongation=(1.0, 1.3),
        nucleus_irregularity=(0.02, 0.05),
        darkness=(0.9, 1.2),
        chromatin=(0.2, 0.3),
        offset=0.25,
    ),
    "parabasal": Morphology(
        radius=(7.5, 12.5),
        elongation=(1.0, 1.35),
        irregularity=0.04,
        density=(0.55, 0.8),
        eosin=(0.0, 0.1),
        light_green=(0.85, 1.0),
        orange=(0.0, 0.0),
        nucleus=(3.3, 4.2),
        nucleus_elongation=(1.0, 1.25),
        nucleus_irregularity=(0.02, 0.05),
        darkness=(1.0, 1.3),
        chromatin=(0.2, 0.3),
        offset=0.15,
    ),
    # Neutrophils: small pale cells with a segmented (2-4 lobed) dark nucleus.
    "inflammatory": Morphology(
        radius=(5.0, 6.5),
        elongation=(1.0, 1.2),
        irregularity=0.05,
        density=(0.15, 0.25),
        eosin=(0.2, 0.5),
        light_green=(0.4, 0.7),
        orange=(0.0, 0.0),
        nucleus=(2.8, 3.5),
        nucleus_elongation=(1.0, 1.3),
        nucleus_irregularity=(0.45, 0.65),
        darkness=(1.6, 2.0),
        chromatin=(0.05, 0.1),
        offset=0.1,
        lobes=3,
    ),
    # Anucleate debris, mucus flecks and bare cytoplasm fragments.
    "debris": Morphology(
        radius=(2.0, 10.0),
        elongation=(1.0, 3.0),
        irregularity=0.22,
        density=(0.1, 0.35),
        eosin=(0.0, 1.0),
        light_green=(0.0, 1.0),
        orange=(0.0, 0.5),
        nucleus=(0.0, 0.0),
        nucleus_elongation=(1.0, 1.0),
        nucleus_irregularity=(0.0, 0.0),
        darkness=(0.0, 0.0),
        chromatin=(0.0, 0.0),
    ),
    # ASC-US: mature cytoplasm, nucleus 2.5-3x the intermediate nucleus area, mild hyperchromasia.
    "ASC-US": Morphology(
        radius=(16, 23),
        elongation=(1.0, 1.5),
        irregularity=0.07,
        density=(0.30, 0.45),
        eosin=(0.0, 0.3),
        light_green=(0.7, 1.0),
        orange=(0.0, 0.05),
        nucleus=(5.3, 5.9),
        nucleus_elongation=(1.0, 1.35),
        nucleus_irregularity=(0.04, 0.07),
        darkness=(1.3, 1.6),
        chromatin=(0.25, 0.35),
    ),
    # LSIL: koilocytes: enlarged raisinoid nucleus, sharp clear perinuclear halo, dense rim.
    "LSIL": Morphology(
        radius=(17, 24),
        elongation=(1.0, 1.5),
        irregularity=0.08,
        density=(0.45, 0.6),
        eosin=(0.0, 0.4),
        light_green=(0.6, 1.0),
        orange=(0.0, 0.1),
        nucleus=(5.8, 7.2),
        nucleus_elongation=(1.0, 1.4),
        nucleus_irregularity=(0.10, 0.16),
        darkness=(1.6, 2.0),
        chromatin=(0.35, 0.45),
        offset=0.1,
        halo=(1.9, 2.6),
        binucleate=0.3,
    ),
    # ASC-H: small immature (metaplastic-sized) cells with a high N/C ratio.
    "ASC-H": Morphology(
        radius=(7.0, 10.5),
        elongation=(1.0, 1.35),
        irregularity=0.05,
        density=(0.55, 0.8),
        eosin=(0.0, 0.1),
        light_green=(0.8, 1.0),
        orange=(0.0, 0.0),
        nucleus=(0.0, 0.0),
        nucleus_elongation=(1.0, 1.3),
        nucleus_irregularity=(0.06, 0.1),
        darkness=(1.5, 1.9),
        chromatin=(0.35, 0.45),
        nc=(0.5, 0.62),
        offset=0.1,
    ),
    # HSIL: small cells, very high N/C, hyperchromatic coarse irregular nuclei, loose groups.
    "HSIL": Morphology(
        radius=(5.5, 9.0),
        elongation=(1.0, 1.4),
        irregularity=0.08,
        density=(0.45, 0.7),
        eosin=(0.0, 0.1),
        light_green=(0.8, 1.0),
        orange=(0.0, 0.0),
        nucleus=(0.0, 0.0),
        nucleus_elongation=(1.0, 1.45),
        nucleus_irregularity=(0.12, 0.2),
        darkness=(2.0, 2.5),
        chromatin=(0.5, 0.6),
        nc=(0.72, 0.86),
        offset=0.05,
    ),
    # Keratinising SCC: bizarre spindle/tadpole cells, dense orange cytoplasm, ink-dark nuclei.
    "SCC": Morphology(
        radius=(8, 16),
        elongation=(1.5, 3.5),
        irregularity=0.14,
        density=(0.6, 0.9),
        eosin=(0.1, 0.3),
        light_green=(0.0, 0.05),
        orange=(0.8, 1.0),
        nucleus=(3.5, 6.5),
        nucleus_elongation=(1.2, 2.5),
        nucleus_irregularity=(0.15, 0.25),
        darkness=(2.6, 3.2),
        chromatin=(0.25, 0.35),
        offset=0.15,
        tail=0.4,
        tail_length=(0.8, 1.8),
    ),
    # AGC: crowded glandular (columnar) cells with enlarged nuclei, in honeycomb clusters.
    "AGC": Morphology(
        radius=(5.0, 7.0),
        elongation=(1.0, 1.3),
        irregularity=0.05,
        density=(0.3, 0.45),
        eosin=(0.0, 0.2),
        light_green=(0.7, 1.0),
        orange=(0.0, 0.0),
        nucleus=(3.6, 4.6),
        nucleus_elongation=(1.1, 1.5),
        nucleus_irregularity=(0.06, 0.1),
        darkness=(1.4, 1.8),
        chromatin=(0.3, 0.4),
        offset=0.1,
    ),
}


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

NORMAL_MIX = np.array([0.32, 0.43, 0.07, 0.12, 0.06])
"""Mean share of each normal kind (superficial .. debris); each slide draws its own mix."""

COMPANIONS: dict[str, tuple[str, ...]] = {
    "ASC-US": (),
    "LSIL": ("ASC-US",),
    "ASC-H": ("ASC-US",),
    "HSIL": ("LSIL", "ASC-H", "ASC-US"),
    "SCC": ("HSIL", "ASC-H"),
    "AGC": ("ASC-US",),
}
"""Less severe findings that often accompany a grade's own cells on the same slide."""

GRADE_SHARE = 0.75
"""Expected share of an abnormal slide's abnormal cells that belong to the slide's grade."""


class GridIndex:
    """Cells bucketed by centre on a square grid, so a region query reads a few buckets."""

    def __init__(self, x: np.ndarray, y: np.ndarray, reach: np.ndarray, bucket_um: float):
        self.bucket_um = bucket_um
        self.nx = max(1, math.ceil((float(x.max()) if len(x) else 0.0) / bucket_um) + 1)
        self.ny = max(1, math.ceil((float(y.max()) if len(y) else 0.0) / bucket_um) + 1)
        self.max_reach = float(reach.max()) if len(reach) else 0.0
        bucket = self._bucket(x, self.nx) + self._bucket(y, self.ny) * self.nx
        self.order = np.argsort(bucket, kind="stable").astype(np.int32)
        self.starts = np.concatenate(
            [[0], np.cumsum(np.bincount(bucket, minlength=self.nx * self.ny))]
        )

    def _bucket(self, v: np.ndarray | float, n: int) -> np.ndarray:
        return np.clip(np.floor(np.asarray(v) / self.bucket_um), 0, n - 1).astype(np.int64)

    def candidates(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """Indices of cells whose centre lies within ``max_reach`` of the rectangle."""
        r = self.max_reach
        bx0, bx1 = (int(b) for b in self._bucket(np.array([x0 - r, x1 + r]), self.nx))
        by0, by1 = (int(b) for b in self._bucket(np.array([y0 - r, y1 + r]), self.ny))
        parts = [
            self.order[self.starts[row * self.nx + bx0] : self.starts[row * self.nx + bx1 + 1]]
            for row in range(by0, by1 + 1)
        ]
        return np.concatenate(parts) if parts else np.empty(0, np.int32)


@dataclass(frozen=True)
class Specimen:
    """One slide's cells in microns; its grade is the most severe class present."""

    width_um: float
    height_um: float
    seed: int
    cells: np.ndarray  # CELL_DTYPE, one row per cell, row number = cell id
    index: GridIndex = field(repr=False)

    @classmethod
    def from_cells(
        cls, width_um: float, height_um: float, cells: np.ndarray, seed: int
    ) -> Specimen:
        """Finish drawn cells (reach, ground-truth boxes) and index them."""
        cells = np.ascontiguousarray(cells, dtype=CELL_DTYPE)
        _finish(cells)
        index = GridIndex(cells["x"], cells["y"], cells["reach"], bucket_um=128.0)
        return cls(float(width_um), float(height_um), int(seed), cells, index)

    @property
    def grade(self) -> str:
        """Ground-truth slide grade: the most severe class among the cells."""
        return slide_grade(set(self.classes()))

    def classes(self) -> list[str]:
        """Ground-truth class name per cell."""
        names = np.array(CELL_KINDS)
        return names[self.cells["kind"]].tolist()

    def query(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """Sorted ids of cells whose drawing may touch the rectangle (um)."""
        idx = self.index.candidates(x0, y0, x1, y1)
        c = self.cells[idx]
        r = c["reach"]
        hit = (c["x"] - r < x1) & (c["x"] + r > x0) & (c["y"] - r < y1) & (c["y"] + r > y0)
        return np.sort(idx[hit])


def make_specimen(
    rng: np.random.Generator, width_um: float, height_um: float, profile: CenterProfile, grade: str
) -> Specimen:
    """Draw a slide of ``grade``: a normal background plus, if abnormal, its findings."""
    if grade not in SEVERITY:
        raise CCSError(f"unknown grade {grade!r}; expected one of {', '.join(SEVERITY)}")
    seed = int(rng.integers(2**62))
    area = _PrepArea.draw(rng, width_um, height_um)
    groups = _GroupCounter()
    parts: list[np.ndarray] = []

    mix = rng.dirichlet(NORMAL_MIX * 25.0)
    n_normal = rng.poisson(profile.cell_density_per_mm2 * area.area_mm2)
    for kind, n in zip(NORMAL_KINDS, rng.multinomial(n_normal, mix), strict=True):
        parts.append(_place_kind(rng, kind, int(n), area, groups))

    if grade != "NILM":
        lo, hi = profile.abnormal_density_per_mm2
        n_abnormal = rng.poisson(rng.uniform(lo, hi) * area.area_mm2)
        for kind, n in _abnormal_counts(rng, grade, n_abnormal).items():
            parts.append(_place_kind(rng, kind, n, area, groups))

    specimen = Specimen.from_cells(width_um, height_um, np.concatenate(parts), seed)
    assert specimen.grade == grade, (specimen.grade, grade)
    return specimen


def cells_in_disc(
    rng: np.random.Generator, kind: str, n: int, cx: float, cy: float, radius_um: float
) -> np.ndarray:
    """``n`` cells of ``kind`` centred in a disc, grouped the way that kind groups."""
    return _place_kind(rng, kind, n, _PrepArea.disc(cx, cy, radius_um), _GroupCounter())


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


@dataclass(frozen=True)
class _PrepArea:
    """The deposited cell area (a ThinPrep-like ellipse) with low-frequency density variation."""

    cx: float
    cy: float
    ax: float
    ay: float
    waves: np.ndarray  # (3, 4): kx, ky, phase, amplitude

    @classmethod
    def draw(cls, rng: np.random.Generator, width: float, height: float) -> _PrepArea:
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
    def disc(cls, cx: float, cy: float, radius: float) -> _PrepArea:
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


class _GroupCounter:
    """Hands out slide-unique group ids."""

    def __init__(self) -> None:
        self.next = 0

    def take(self, n: int) -> np.ndarray:
        ids = np.arange(self.next, self.next + n, dtype=np.int32)
        self.next += n
        return ids


def _place_kind(
    rng: np.random.Generator, kind: str, n: int, area: _PrepArea, groups: _GroupCounter
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
    rng: np.random.Generator, n: int, area: _PrepArea, groups: _GroupCounter
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


def _abnormal_counts(rng: np.random.Generator, grade: str, n: int) -> dict[str, int]:
    """Abnormal cells per class: mostly the grade's own, the rest milder companions."""
    companions = COMPANIONS[grade]
    n = max(n, 2)
    own = max(2, int(rng.binomial(n, GRADE_SHARE if companions else 1.0)))
    counts = {grade: own}
    if companions and n > own:
        shares = rng.multinomial(n - own, np.full(len(companions), 1.0 / len(companions)))
        for kind, k in zip(companions, shares, strict=True):
            if k:
                counts[kind] = int(k)
    return counts


def contour_table(
    shape: np.ndarray,
    tail: np.ndarray | None = None,
    tail_dir: np.ndarray | None = None,
    samples: int = 96,
) -> np.ndarray:
    """Contour radius relative to the mean radius at ``samples`` angles over [0, 2 pi), (n, S).

    The one definition of a cell's outline: the renderer looks it up per pixel and the
    ground-truth boxes sample it, so boxes fit what is drawn. ``tail`` is relative to radius.
    """
    phi, cos_k, sin_k = _harmonic_basis(samples)
    table = np.maximum(1.0 + shape[:, :, 0] @ cos_k + shape[:, :, 1] @ sin_k, 0.2)
    if tail is not None and tail_dir is not None:
        table += tail[:, None] * np.maximum(np.cos(phi[None, :] - tail_dir[:, None]), 0.0) ** 16
    return table.astype(np.float32)


@functools.cache
def _harmonic_basis(samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Angles and cos/sin of each harmonic at them, (S,), (K, S), (K, S)."""
    phi = np.arange(samples, dtype=np.float64) * (2 * np.pi / samples)
    k = np.arange(1, HARMONICS + 1, dtype=np.float64)
    return phi, np.cos(np.outer(k, phi)), np.sin(np.outer(k, phi))


def contour_extent(
    x: np.ndarray,
    y: np.ndarray,
    radius: np.ndarray,
    aspect: np.ndarray,
    theta: np.ndarray,
    shape: np.ndarray,
    tail: np.ndarray | None = None,
    tail_dir: np.ndarray | None = None,
    samples: int = 128,
) -> np.ndarray:
    """Tight (n, 4) x0, y0, x1, y1 of star-shaped contours (``tail`` in um here)."""
    rel_tail = None if tail is None else tail / np.maximum(radius, 1e-6)
    b = radius[:, None] * contour_table(shape, rel_tail, tail_dir, samples)
    phi = np.arange(samples) * (2 * np.pi / samples)
    u = b * np.cos(phi) * aspect[:, None]
    v = b * np.sin(phi) / aspect[:, None]
    ct, st = np.cos(theta)[:, None], np.sin(theta)[:, None]
    dx = u * ct - v * st
    dy = u * st + v * ct
    return np.stack([x + dx.min(1), y + dy.min(1), x + dx.max(1), y + dy.max(1)], axis=1).astype(
        np.float64
    )


def _finish(cells: np.ndarray, chunk: int = 8192) -> None:
    """Fill ``reach`` and ``box`` from each cell's contour and nuclei."""
    for s in range(0, len(cells), chunk):
        c = cells[s : s + chunk]
        box = contour_extent(
            c["x"],
            c["y"],
            c["radius"],
            c["aspect"],
            c["theta"],
            c["shape"],
            c["tail"],
            c["tail_dir"],
        )
        has_nuc = c["nuc_radius"] > 0
        for dx, dy, on in (
            (c["nuc_dx"], c["nuc_dy"], has_nuc),
            (c["nuc2_dx"], c["nuc2_dy"], has_nuc & c["binucleate"]),
        ):
            scale = np.maximum(c["halo"], 1.0) * c["nuc_radius"]
            nb = contour_extent(
                c["x"] + dx, c["y"] + dy, scale, c["nuc_aspect"], c["nuc_theta"], c["nuc_shape"]
            )
            box[on, :2] = np.minimum(box[on, :2], nb[on, :2])
            box[on, 2:] = np.maximum(box[on, 2:], nb[on, 2:])
        c["box"] = box
        reach = np.max(np.abs(box - np.stack([c["x"], c["y"], c["x"], c["y"]], axis=1)), axis=1)
        c["reach"] = reach * 1.05 + 0.5


def cell_areas(cells: np.ndarray, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Cytoplasm and total nuclear area per cell, um^2 (pi * mean squared contour radius)."""
    cyto = np.empty(len(cells))
    nuc = np.empty(len(cells))
    for s in range(0, len(cells), chunk):
        c = cells[s : s + chunk]
        rel_tail = c["tail"] / np.maximum(c["radius"], 1e-6)
        t = contour_table(c["shape"], rel_tail, c["tail_dir"])
        cyto[s : s + chunk] = np.pi * c["radius"] ** 2 * np.mean(t.astype(np.float64) ** 2, 1)
        t = contour_table(c["nuc_shape"])
        nuclei = 1 + c["binucleate"].astype(np.float64)
        nuc[s : s + chunk] = np.pi * c["nuc_radius"] ** 2 * np.mean(t.astype(np.float64) ** 2, 1)
        nuc[s : s + chunk] *= nuclei
    return cyto, nuc
