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
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import math
import multiprocessing as mp
import os
import queue as queue_module
import shutil
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from smartccs import __version__
from smartccs.checksums import sha256_file
from smartccs.errors import CCSError
from smartccs.ids import validate_id
from smartccs.manifest import MANIFEST_NAME, Manifest, SlideEntry
from smartccs.synth.profiles import CenterProfile, load_profiles
from smartccs.synth.render import Renderer
from smartccs.synth.specimen import (
    CELL_KINDS,
    NORMAL_KINDS,
    Specimen,
    cell_areas,
    make_specimen,
)
from smartccs.synth.writer import SlideFormat, level_dimensions, write_pyramid
from smartccs.taxonomy import ABNORMAL_CLASSES, GRADES

log = logging.getLogger(__name__)

Size = Literal["tiny", "small", "medium", "large"]

SIZES_UM: dict[str, float] = {"tiny": 1000.0, "small": 3000.0, "medium": 8000.0, "large": 20000.0}
"""Physical side of a square slide scan per size (large = 80,000 px at 0.25 um/px)."""

BATCH = "synth"
MIN_LEVEL_PX = 1024
PROGRESS_EVERY = 32
"""Tiles a worker renders between progress reports."""

TABLE_METADATA = {b"smartccs.synthetic": b"true", b"smartccs.schema_version": b"1"}


def _count_column(kind: str) -> str:
    return "n_" + kind.lower().replace("-", "_")


SLIDES_SCHEMA = pa.schema(
    [
        pa.field("slide_id", pa.string(), nullable=False),
        pa.field("center", pa.string(), nullable=False),
        pa.field("grade", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),
        pa.field("format", pa.string(), nullable=False),
        pa.field("mpp", pa.float64(), nullable=False),
        pa.field("width_px", pa.int32(), nullable=False),
        pa.field("height_px", pa.int32(), nullable=False),
        pa.field("width_um", pa.float64(), nullable=False),
        pa.field("height_um", pa.float64(), nullable=False),
        pa.field("n_cells", pa.int32(), nullable=False),
        pa.field("n_abnormal", pa.int32(), nullable=False),
        *(pa.field(_count_column(k), pa.int32(), nullable=False) for k in CELL_KINDS),
    ],
    metadata=TABLE_METADATA,
)
"""Ground truth per slide: identity, scan geometry and cell counts per class."""

CELLS_SCHEMA = pa.schema(
    [
        pa.field("slide_id", pa.string(), nullable=False),
        pa.field("cell_id", pa.int32(), nullable=False),
        pa.field("class", pa.string(), nullable=False),
        pa.field("is_abnormal", pa.bool_(), nullable=False),
        pa.field("group_id", pa.int32(), nullable=False),  # sheet/cluster, -1 = single cell
        pa.field("x0", pa.int32(), nullable=False),  # level-0 px, [x0, x1) x [y0, y1)
        pa.field("y0", pa.int32(), nullable=False),
        pa.field("x1", pa.int32(), nullable=False),
        pa.field("y1", pa.int32(), nullable=False),
        pa.field("x0_um", pa.float64(), nullable=False),
        pa.field("y0_um", pa.float64(), nullable=False),
        pa.field("x1_um", pa.float64(), nullable=False),
        pa.field("y1_um", pa.float64(), nullable=False),
        pa.field("cell_area_um2", pa.float32(), nullable=False),
        pa.field("nucleus_area_um2", pa.float32(), nullable=False),
    ],
    metadata=TABLE_METADATA,
)
"""Ground truth per cell: class and box (level-0 pixels and microns)."""


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


@dataclass(frozen=True)
class _SlideJob:
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
class _SlideDone:
    job: _SlideJob
    sha256: str
    bytes: int
    width_px: int
    height_px: int
    counts: dict[str, int]
    seconds: float


def scan_size(width_um: float, height_um: float, mpp: float) -> tuple[int, int]:
    """Level-0 pixels of a scan of the given physical size."""
    return round(width_um / mpp), round(height_um / mpp)


def render_slide(
    specimen: Specimen,
    profile: CenterProfile,
    path: str | Path,
    *,
    mpp: float,
    fmt: SlideFormat,
    on_tile: Callable[[], None] | None = None,
) -> None:
    """Scan ``specimen`` with ``profile``'s optics at ``mpp`` into a pyramidal slide file.

    Every level is rendered from the specimen itself (not downsampled from the level above), so
    memory stays at a few tiles and every level is as sharp as a scanner's.
    """
    width, height = scan_size(specimen.width_um, specimen.height_um, mpp)
    renderer = Renderer(specimen, profile, specimen.seed)

    def render(level: int, downsample: float, x: int, y: int, w: int, h: int) -> np.ndarray:
        p = downsample * mpp
        tile = renderer.region(x * p, y * p, w, h, p)
        if on_tile is not None:
            on_tile()
        return tile

    write_pyramid(
        path,
        width=width,
        height=height,
        mpp=mpp,
        fmt=fmt,
        render=render,
        tile_size=profile.scanner.tile_size,
        jpeg_quality=profile.scanner.jpeg_quality,
        pyramid_factor=profile.scanner.pyramid_factor,
        min_level_px=MIN_LEVEL_PX,
    )


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
    if size not in SIZES_UM:
        raise CCSError(f"unknown size {size!r}; expected one of {', '.join(SIZES_UM)}")
    if slides_per_center < 1:
        raise CCSError(f"slides per center must be at least 1, got {slides_per_center}")
    if seed < 0:
        raise CCSError(f"seed must be non-negative, got {seed}")
    chosen = _choose_centers(load_profiles(profiles), centers, center_names)
    if abnormal_density_scale != 1.0:
        chosen = [p.with_abnormal_density_scaled(abnormal_density_scale) for p in chosen]
    out = Path(out)
    extent = SIZES_UM[size]
    jobs: list[_SlideJob] = []
    for profile in chosen:
        key = zlib.crc32(profile.name.encode())
        rng = np.random.default_rng(np.random.SeedSequence([seed, key]))
        grades = _allocate_grades(rng, profile.prevalence, slides_per_center)
        center_dir = out / profile.name
        (center_dir / "slides" / ".partial").mkdir(parents=True, exist_ok=True)
        (center_dir / "ground_truth" / ".parts").mkdir(parents=True, exist_ok=True)
        jobs += [
            _SlideJob(profile, key, i + 1, g, extent, seed, center_dir)
            for i, g in enumerate(grades)
        ]
        log.info(
            "center %s (%s): %d %s slides at %.4g um/px (%s), grades %s -> %s",
            profile.name,
            profile.kind,
            slides_per_center,
            size,
            profile.scanner.mpp,
            profile.scanner.format,
            dict(sorted(Counter(grades).items(), key=lambda kv: GRADES.index(kv[0]))),
            center_dir,
        )

    n_workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    log.info(
        "generating %d synthetic slides (%s, %.0f um square) with %d worker(s)",
        len(jobs),
        size,
        extent,
        n_workers,
    )
    done: dict[str, list[_SlideDone]] = {p.name: [] for p in chosen}
    summaries: dict[str, CenterSummary] = {}
    bar = tqdm(total=sum(j.tiles() for j in jobs), unit="tile", disable=not progress, desc="synth")

    def finished(result: _SlideDone) -> None:
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
        done[j.profile.name].append(result)
        if len(done[j.profile.name]) == slides_per_center:
            summaries[j.profile.name] = _finish_center(j.profile, done[j.profile.name], out)

    with bar, logging_redirect_tqdm():
        if n_workers == 1:
            for job in jobs:
                finished(_make_slide(job, lambda n: bar.update(n)))
        else:
            _run_pool(jobs, n_workers, bar, finished)

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


def _choose_centers(
    profiles: list[CenterProfile], n: int | None, names: list[str] | None
) -> list[CenterProfile]:
    if n is not None and names is not None:
        raise CCSError("give either a number of centers or center names, not both")
    if names is not None:
        by_name = {p.name: p for p in profiles}
        unknown = [x for x in names if x not in by_name]
        if unknown:
            raise CCSError(
                f"unknown center(s) {', '.join(unknown)}; profiles define {', '.join(by_name)}"
            )
        if len(set(names)) != len(names):
            raise CCSError(f"center names repeat: {', '.join(names)}")
        return [by_name[x] for x in names]
    if n is None:
        return profiles
    if not 1 <= n <= len(profiles):
        raise CCSError(f"centers must be between 1 and {len(profiles)} (profiles defined), got {n}")
    return profiles[:n]


def _allocate_grades(rng: np.random.Generator, prevalence: dict[str, float], n: int) -> list[str]:
    """Grades in proportion to prevalence, shuffled.

    Each grade gets the whole part of its expected count; the slides left over go to distinct
    grades drawn with probability proportional to the fractional parts. Unlike independent
    draws, a handful of slides per center still mixes NILM and abnormal slides, and unlike a
    fixed largest-remainder rule, centers differ in which findings they carry.
    """
    expected = np.array([prevalence.get(g, 0.0) * n for g in GRADES])
    counts = np.floor(expected + 1e-9).astype(int)
    fraction = np.clip(expected - counts, 0.0, None)
    left = n - int(counts.sum())
    if left:
        extra = rng.choice(len(GRADES), size=left, replace=False, p=fraction / fraction.sum())
        counts[extra] += 1
    grades = [g for g, c in zip(GRADES, counts, strict=True) for _ in range(c)]
    return [grades[i] for i in rng.permutation(n)]


def _make_slide(job: _SlideJob, report: Callable[[int], None]) -> _SlideDone:
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
    table = _cells_table(job.slide_id, specimen, scanner.mpp, width, height)
    _atomic_parquet(table, job.part_path)
    os.replace(partial, final)
    counts = Counter(specimen.classes())
    return _SlideDone(
        job=job,
        sha256=sha256_file(final),
        bytes=final.stat().st_size,
        width_px=width,
        height_px=height,
        counts={k: counts.get(k, 0) for k in CELL_KINDS},
        seconds=time.perf_counter() - t0,
    )


_worker_queue: mp.Queue | None = None


def _init_worker(queue: mp.Queue) -> None:
    global _worker_queue
    _worker_queue = queue


def _make_slide_in_worker(job: _SlideJob) -> _SlideDone:
    queue = _worker_queue
    assert queue is not None
    return _make_slide(job, queue.put)


def _run_pool(
    jobs: Sequence[_SlideJob],
    n_workers: int,
    bar: tqdm,
    finished: Callable[[_SlideDone], None],
) -> None:
    """Slides in spawned processes (safe beside threads or Ray), progress through a queue."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set() or not queue.empty():
            try:
                bar.update(queue.get(timeout=0.2))
            except queue_module.Empty:
                continue

    reader = threading.Thread(target=drain, name="synth-progress", daemon=True)
    reader.start()
    try:
        with cf.ProcessPoolExecutor(
            n_workers, mp_context=ctx, initializer=_init_worker, initargs=(queue,)
        ) as pool:
            futures = [pool.submit(_make_slide_in_worker, j) for j in jobs]
            try:
                for fut in cf.as_completed(futures):
                    finished(fut.result())
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    finally:
        stop.set()
        reader.join()
        queue.close()


def _cells_table(
    slide_id: str, specimen: Specimen, mpp: float, width: int, height: int
) -> pa.Table:
    cells = specimen.cells
    box = cells["box"]
    x0 = np.clip(box[:, 0], 0.0, specimen.width_um)
    y0 = np.clip(box[:, 1], 0.0, specimen.height_um)
    x1 = np.clip(box[:, 2], 0.0, specimen.width_um)
    y1 = np.clip(box[:, 3], 0.0, specimen.height_um)
    px0 = np.clip(np.floor(x0 / mpp), 0, width - 1).astype(np.int32)
    py0 = np.clip(np.floor(y0 / mpp), 0, height - 1).astype(np.int32)
    px1 = np.maximum(np.clip(np.ceil(x1 / mpp), 0, width), px0 + 1).astype(np.int32)
    py1 = np.maximum(np.clip(np.ceil(y1 / mpp), 0, height), py0 + 1).astype(np.int32)
    names = np.array(CELL_KINDS)[cells["kind"]]
    cell_area, nucleus_area = cell_areas(cells)
    columns = {
        "slide_id": pa.array([slide_id] * len(cells), pa.string()),
        "cell_id": np.arange(len(cells), dtype=np.int32),
        "class": pa.array(names.tolist(), pa.string()),
        "is_abnormal": cells["kind"] >= len(NORMAL_KINDS),
        "group_id": cells["group"].astype(np.int32),
        "x0": px0,
        "y0": py0,
        "x1": px1,
        "y1": py1,
        "x0_um": x0,
        "y0_um": y0,
        "x1_um": x1,
        "y1_um": y1,
        "cell_area_um2": cell_area.astype(np.float32),
        "nucleus_area_um2": nucleus_area.astype(np.float32),
    }
    return pa.table(columns, schema=CELLS_SCHEMA)


def _finish_center(profile: CenterProfile, results: list[_SlideDone], out: Path) -> CenterSummary:
    """Merge the center's ground truth in slide order and write its manifest last."""
    results = sorted(results, key=lambda r: r.job.number)
    center_dir = results[0].job.center_dir
    gt = center_dir / "ground_truth"
    tmp = gt / ".parts" / "cells.parquet.tmp"
    with pq.ParquetWriter(tmp, CELLS_SCHEMA) as writer:
        for r in results:
            writer.write_table(pq.read_table(r.job.part_path, schema=CELLS_SCHEMA))
    os.replace(tmp, gt / "cells.parquet")
    rows = [
        {
            "slide_id": r.job.slide_id,
            "center": profile.name,
            "grade": r.job.grade,
            "path": r.job.rel_path,
            "sha256": r.sha256,
            "bytes": r.bytes,
            "format": profile.scanner.format,
            "mpp": profile.scanner.mpp,
            "width_px": r.width_px,
            "height_px": r.height_px,
            "width_um": r.job.extent_um,
            "height_um": r.job.extent_um,
            "n_cells": sum(r.counts.values()),
            "n_abnormal": sum(r.counts[k] for k in ABNORMAL_CLASSES),
            **{_count_column(k): r.counts[k] for k in CELL_KINDS},
        }
        for r in results
    ]
    _atomic_parquet(pa.Table.from_pylist(rows, schema=SLIDES_SCHEMA), gt / "slides.parquet")
    shutil.rmtree(gt / ".parts")
    shutil.rmtree(center_dir / "slides" / ".partial", ignore_errors=True)
    manifest = Manifest(
        center=profile.name,
        batch=BATCH,
        slides=[
            SlideEntry(
                slide_id=r.job.slide_id,
                path=r.job.rel_path,
                sha256=r.sha256,
                bytes=r.bytes,
                grade=r.job.grade,
            )
            for r in results
        ],
    )
    _atomic_bytes(manifest.dumps(), center_dir / MANIFEST_NAME)
    grades = Counter(r.job.grade for r in results)
    return CenterSummary(
        name=profile.name,
        kind=profile.kind,
        folder=str(center_dir.relative_to(out)),
        mpp=profile.scanner.mpp,
        format=profile.scanner.format,
        slides=len(results),
        grades={g: grades[g] for g in GRADES if grades[g]},
        cells=sum(sum(r.counts.values()) for r in results),
        bytes=sum(r.bytes for r in results),
    )


def _write_cohort_json(
    out: Path, chosen: list[CenterProfile], seed: int, size: str, slides_per_center: int
) -> None:
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
    _atomic_bytes((json.dumps(doc, indent=2, sort_keys=True) + "\n").encode(), out / "cohort.json")


def _atomic_bytes(data: bytes, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _atomic_parquet(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
