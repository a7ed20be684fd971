"""One slide of a cohort: what to make, making it, and what came out.

A ``SlideJob`` is everything a worker process needs (it is pickled to spawned workers), and
``make_slide`` is the whole of a worker's work: draw the specimen from the slide's own seed,
scan it, write its cells' ground truth, and move the finished file into place.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smartccs.checksums import sha256_file
from smartccs.ids import validate_id
from smartccs.synth.atomic_write import atomic_write_parquet
from smartccs.synth.cell_table import CELL_KINDS
from smartccs.synth.ground_truth import cells_table
from smartccs.synth.profiles import CenterProfile
from smartccs.synth.scan import MIN_LEVEL_PX, render_slide, scan_size
from smartccs.synth.specimen import make_specimen
from smartccs.synth.writer import level_dimensions

PROGRESS_EVERY = 32
"""Tiles a worker renders between progress reports."""


@dataclass(frozen=True)
class SlideJob:
    """One slide to make: its center, number, grade, size and where it goes."""

    profile: CenterProfile
    center_key: int
    number: int  # 1-based within the center
    grade: str
    extent_um: float
    seed: int
    center_dir: Path

    @property
    def slide_id(self) -> str:
        return validate_id(f"{self.profile.name}-s{self.number:04d}", "slide id")

    @property
    def rel_path(self) -> str:
        return f"slides/{self.slide_id}.{self.profile.scanner.format}"

    @property
    def part_path(self) -> Path:
        return self.center_dir / "ground_truth" / ".parts" / f"{self.slide_id}.parquet"

    def tiles(self) -> int:
        s = self.profile.scanner
        width, height = scan_size(self.extent_um, self.extent_um, s.mpp)
        levels = level_dimensions(width, height, s.pyramid_factor, MIN_LEVEL_PX)
        return sum(math.ceil(w / s.tile_size) * math.ceil(h / s.tile_size) for w, h, _ in levels)


@dataclass(frozen=True)
class SlideResult:
    """A made slide: its job, file checksum and size, scan size and cell counts."""

    job: SlideJob
    sha256: str
    bytes: int
    width_px: int
    height_px: int
    counts: dict[str, int]
    seconds: float


def make_slide(job: SlideJob, report: Callable[[int], None]) -> SlideResult:
    """Draw, render and describe one slide (runs in a worker process)."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(np.random.SeedSequence([job.seed, job.center_key, job.number]))
    specimen = make_specimen(rng, job.extent_um, job.extent_um, job.profile, job.grade)
    scanner = job.profile.scanner
    final = job.center_dir / job.rel_path
    partial = final.parent / ".partial" / final.name
    pending = 0

    def on_tile() -> None:
        nonlocal pending
        pending += 1
        if pending >= PROGRESS_EVERY:
            report(pending)
            pending = 0

    render_slide(
        specimen, job.profile, partial, mpp=scanner.mpp, fmt=scanner.format, on_tile=on_tile
    )
    report(pending)
    width, height = scan_size(specimen.width_um, specimen.height_um, scanner.mpp)
    table = cells_table(job.slide_id, specimen, scanner.mpp, width, height)
    atomic_write_parquet(table, job.part_path)
    os.replace(partial, final)
    counts = Counter(specimen.classes())
    return SlideResult(
        job=job,
        sha256=sha256_file(final),
        bytes=final.stat().st_size,
        width_px=width,
        height_px=height,
        counts={k: counts.get(k, 0) for k in CELL_KINDS},
        seconds=time.perf_counter() - t0,
    )
