"""A synthetic multi-center cohort on disk: slides, manifests and ground truth per center.

Layout per center (a folder a center could upload as one batch)::

    out/cohort.json                               what was generated, from which profiles
    out/<center>/manifest.json                    Manifest(center, batch="synth"), grades
    out/<center>/slides/<center>-s0001.svs|tiff   pyramidal tiled JPEG TIFF
    out/<center>/ground_truth/slides.parquet      one row per slide
    out/<center>/ground_truth/cells.parquet       one row per cell, boxes in px and um

Every byte is a function of the arguments: per-slide seeds come from
``SeedSequence([seed, center key, slide number])`` (the key is a CRC of the center name, so a
center's slides do not change when other centers are added or selected), nothing records a
time, and worker count and completion order do not matter. Slides are generated in parallel
processes; each renders tile by tile through ``write_pyramid``, so memory per worker is the
cell table plus a few tiles whatever the slide size.

This module is the entry point that ties the steps together: ``cohort_plan`` (centers, grades,
seeds), ``slide_job`` (one slide), ``worker_pool`` (many at once), ``center_output`` (a center's
folder made whole), and ``cohort.json`` last.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from smartccs import __version__
from smartccs.errors import CCSError
from smartccs.synth.atomic_write import atomic_write_bytes
from smartccs.synth.center_output import finish_center
from smartccs.synth.cohort_plan import choose_centers, plan_center
from smartccs.synth.cohort_summary import CenterSummary, CohortSummary
from smartccs.synth.profiles import CenterProfile, load_profiles
from smartccs.synth.scan import SIZES_UM, Size
from smartccs.synth.slide_job import SlideJob, SlideResult, make_slide
from smartccs.synth.worker_pool import make_slides_in_pool
from smartccs.taxonomy import ABNORMAL_CLASSES, GRADES

log = logging.getLogger(__name__)


def generate_cohort(
    out: str | Path,
    *,
    centers: int | None = None,
    center_names: list[str] | None = None,
    slides_per_center: int,
    size: Size,
    seed: int,
    profiles: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
    abnormal_density_scale: float = 1.0,
) -> CohortSummary:
    """Generate a SYNTHETIC cohort: per center a batch folder of slides, manifest, ground truth.

    ``centers`` takes the first N profiles, ``center_names`` picks by name, neither takes all.
    ``abnormal_density_scale`` multiplies every profile's abnormal cells per mm^2
    (:meth:`CenterProfile.with_abnormal_density_scaled`); cohort.json records the scaled
    profiles.
    """
    started = time.perf_counter()
    _check_arguments(size, slides_per_center, seed)
    chosen = choose_centers(load_profiles(profiles), centers, center_names)
    if abnormal_density_scale != 1.0:
        chosen = [p.with_abnormal_density_scaled(abnormal_density_scale) for p in chosen]
    out = Path(out)
    extent = SIZES_UM[size]
    jobs: list[SlideJob] = []
    for profile in chosen:
        center_jobs = plan_center(profile, out / profile.name, slides_per_center, extent, seed)
        _log_center(profile, center_jobs, size)
        jobs += center_jobs

    n_workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    log.info(
        "generating %d synthetic slides (%s, %.0f um square) with %d worker(s)",
        len(jobs),
        size,
        extent,
        n_workers,
    )
    summaries = _make_slides(jobs, out, slides_per_center, n_workers, progress)
    _write_cohort_json(out, chosen, seed, size, slides_per_center)
    summary = CohortSummary(
        out=str(out),
        seed=seed,
        size=size,
        slides_per_center=slides_per_center,
        centers=[summaries[p.name] for p in chosen],
        slides=len(jobs),
        bytes=sum(c.bytes for c in summaries.values()),
        seconds=round(time.perf_counter() - started, 3),
    )
    log.info(
        "wrote %d synthetic slides (%.1f MB) for %d centers to %s in %.1f s",
        summary.slides,
        summary.bytes / 1e6,
        len(summary.centers),
        out,
        summary.seconds,
    )
    return summary


def _check_arguments(size: str, slides_per_center: int, seed: int) -> None:
    """Refuse an unknown size, an empty center or a negative seed before anything is written."""
    if size not in SIZES_UM:
        raise CCSError(f"unknown size {size!r}; expected one of {', '.join(SIZES_UM)}")
    if slides_per_center < 1:
        raise CCSError(f"slides per center must be at least 1, got {slides_per_center}")
    if seed < 0:
        raise CCSError(f"seed must be non-negative, got {seed}")


def _log_center(profile: CenterProfile, jobs: list[SlideJob], size: str) -> None:
    grades = Counter(j.grade for j in jobs)
    log.info(
        "center %s (%s): %d %s slides at %.4g um/px (%s), grades %s -> %s",
        profile.name,
        profile.kind,
        len(jobs),
        size,
        profile.scanner.mpp,
        profile.scanner.format,
        dict(sorted(grades.items(), key=lambda kv: GRADES.index(kv[0]))),
        jobs[0].center_dir,
    )


def _make_slides(
    jobs: list[SlideJob], out: Path, slides_per_center: int, n_workers: int, progress: bool
) -> dict[str, CenterSummary]:
    """Make every slide; each center's folder is finished as soon as its last slide is done."""
    done: dict[str, list[SlideResult]] = {j.profile.name: [] for j in jobs}
    summaries: dict[str, CenterSummary] = {}
    bar = tqdm(total=sum(j.tiles() for j in jobs), unit="tile", disable=not progress, desc="synth")

    def finished(result: SlideResult) -> None:
        _log_slide(result)
        name = result.job.profile.name
        done[name].append(result)
        if len(done[name]) == slides_per_center:
            summaries[name] = finish_center(result.job.profile, done[name], out)

    with bar, logging_redirect_tqdm():
        if n_workers == 1:
            for job in jobs:
                finished(make_slide(job, lambda n: bar.update(n)))
        else:
            make_slides_in_pool(jobs, n_workers, bar, finished)
    return summaries


def _log_slide(result: SlideResult) -> None:
    j = result.job
    log.info(
        "%s %s: %dx%d px, %d cells (%d abnormal), %.1f s",
        j.slide_id,
        j.grade,
        result.width_px,
        result.height_px,
        sum(result.counts.values()),
        sum(result.counts[k] for k in ABNORMAL_CLASSES),
        result.seconds,
    )


def _write_cohort_json(
    out: Path, chosen: list[CenterProfile], seed: int, size: str, slides_per_center: int
) -> None:
    """Record what was generated, from which (possibly scaled) profiles; no time, no host."""
    doc = {
        "synthetic": True,
        "note": "SYNTHETIC cohort generated by smartccs synth; not patient data. "
        "Label every result computed on it as synthetic.",
        "generator": f"smartccs {__version__}",
        "seed": seed,
        "size": size,
        "extent_um": SIZES_UM[size],
        "slides_per_center": slides_per_center,
        "centers": [p.model_dump(mode="json") for p in chosen],
    }
    atomic_write_bytes(
        (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode(), out / "cohort.json"
    )
