"""What a cohort generation returns: per center and overall counts, and a few lines for people.

Kept apart from the generator so callers (the CLI, the study, benches) can type against the
summary without importing the rendering machinery's internals.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from smartccs.synth.scan import Size
from smartccs.synth.writer import SlideFormat


class CenterSummary(BaseModel):
    """What was generated for one center."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: Literal["internal", "external"]
    folder: str = Field(description="center folder, relative to the cohort root")
    mpp: float
    format: SlideFormat
    slides: int
    grades: dict[str, int] = Field(description="slides per ground-truth grade")
    cells: int
    bytes: int = Field(description="total size of the slide files")


class CohortSummary(BaseModel):
    """What ``generate_cohort`` wrote; the cohort is synthetic, and so is any result on it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    out: str
    synthetic: Literal[True] = True
    seed: int
    size: Size
    slides_per_center: int
    centers: list[CenterSummary]
    slides: int
    bytes: int
    seconds: float = Field(description="wall time of the generation (not written to disk)")

    def describe(self) -> str:
        """A few lines for a person: where, what, and the grades per center."""
        lines = [
            f"SYNTHETIC cohort in {self.out}: {self.slides} slides from {len(self.centers)} "
            f"centers ({self.size}, seed {self.seed}), {self.bytes / 1e6:.1f} MB, "
            f"{self.seconds:.1f} s"
        ]
        for c in self.centers:
            grades = ", ".join(f"{g} {n}" for g, n in c.grades.items())
            lines.append(
                f"  {c.name} ({c.kind}, {c.mpp:g} um/px {c.format}): {c.slides} slides "
                f"[{grades}], {c.cells} cells -> {c.folder}/manifest.json"
            )
        return "\n".join(lines)
