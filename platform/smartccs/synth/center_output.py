"""A center's batch folder made whole: merged ground truth, slides table, manifest written last.

Slides finish in any order and in any process; once a center's last slide is done its parts
are merged in slide order, so the folder's bytes do not depend on scheduling, and the manifest
(the file an upload looks for) appears only when everything it lists is in place.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from smartccs.manifest import MANIFEST_NAME, Manifest, SlideEntry
from smartccs.synth.atomic_write import atomic_write_bytes, atomic_write_parquet
from smartccs.synth.cell_table import CELL_KINDS
from smartccs.synth.cohort_summary import CenterSummary
from smartccs.synth.ground_truth import CELLS_SCHEMA, SLIDES_SCHEMA, count_column
from smartccs.synth.profiles import CenterProfile
from smartccs.synth.slide_job import SlideResult
from smartccs.taxonomy import ABNORMAL_CLASSES, GRADES

BATCH = "synth"
"""The batch name every synthetic center's manifest carries."""


def finish_center(profile: CenterProfile, results: list[SlideResult], out: Path) -> CenterSummary:
    """Merge the center's ground truth in slide order and write its manifest last."""
    results = sorted(results, key=lambda r: r.job.number)
    center_dir = results[0].job.center_dir
    gt = center_dir / "ground_truth"
    _merge_cell_parts(results, gt)
    atomic_write_parquet(_slides_table(profile, results), gt / "slides.parquet")
    shutil.rmtree(gt / ".parts")
    shutil.rmtree(center_dir / "slides" / ".partial", ignore_errors=True)
    atomic_write_bytes(_manifest(profile, results).dumps(), center_dir / MANIFEST_NAME)
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


def _merge_cell_parts(results: list[SlideResult], gt: Path) -> None:
    """Concatenate the slides' cell tables, in the given order, into ``cells.parquet``."""
    tmp = gt / ".parts" / "cells.parquet.tmp"
    with pq.ParquetWriter(tmp, CELLS_SCHEMA) as writer:
        for r in results:
            writer.write_table(pq.read_table(r.job.part_path, schema=CELLS_SCHEMA))
    os.replace(tmp, gt / "cells.parquet")


def _slides_table(profile: CenterProfile, results: list[SlideResult]) -> pa.Table:
    """One row per slide: identity, scan geometry and cell counts per class."""
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
            **{count_column(k): r.counts[k] for k in CELL_KINDS},
        }
        for r in results
    ]
    return pa.Table.from_pylist(rows, schema=SLIDES_SCHEMA)


def _manifest(profile: CenterProfile, results: list[SlideResult]) -> Manifest:
    """The center's upload manifest: every slide with its checksum and ground-truth grade."""
    return Manifest(
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
