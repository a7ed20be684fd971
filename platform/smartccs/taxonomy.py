"""The Bethesda classes Smart-CCS detects and the grades it reports.

Class order is the model's output order and never changes; severity order is clinical and
decides a slide's grade from the cells on it.
"""

import math
from typing import Literal

ABNORMAL_CLASSES: tuple[str, ...] = ("ASC-US", "LSIL", "ASC-H", "HSIL", "SCC", "AGC")
"""The detector's six abnormal-cell classes, in output order."""

GRADES: tuple[str, ...] = ("NILM", *ABNORMAL_CLASSES)
"""The slide classifier's seven grades, in output order (index 0 is NILM)."""

Grade = Literal["NILM", "ASC-US", "LSIL", "ASC-H", "HSIL", "SCC", "AGC"]

SEVERITY: dict[str, int] = {
    "NILM": 0,
    "ASC-US": 1,
    "LSIL": 2,
    "ASC-H": 3,
    "AGC": 4,
    "HSIL": 5,
    "SCC": 6,
}
"""Clinical severity: squamous carcinoma above HSIL above glandular atypia above ASC-H."""


def slide_grade(cell_classes: list[str] | tuple[str, ...] | set[str]) -> str:
    """A slide's grade is the most severe abnormal class present, NILM when none is."""
    abnormal = [c for c in cell_classes if c in SEVERITY and c != "NILM"]
    return max(abnormal, key=SEVERITY.__getitem__, default="NILM")


BETHESDA_MIN_SQUAMOUS = 5000
"""Well-visualised, well-preserved squamous cells an adequate liquid-based preparation holds
(The Bethesda System 2014; a conventional smear needs 8,000-12,000)."""

THINPREP_SPOT_MM = 20.0
"""Diameter of a ThinPrep preparation spot (SurePath: 13 mm): the area Bethesda's count is for."""


def preparation_share(scanned_mm2: float, spot_mm: float = THINPREP_SPOT_MM) -> float:
    """The share of a preparation spot that an image of ``scanned_mm2`` covers (at most 1): a
    preparation spreads its cells over the spot, so a part of it holds that part of them."""
    return min(1.0, scanned_mm2 / (math.pi * (spot_mm / 2) ** 2))
