"""The Bethesda classes Smart-CCS detects and the grades it reports.

Class order is the model's output order and never changes; severity order is clinical and
decides a slide's grade from the cells on it.
"""

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
