"""Cell annotations for a committed batch: the boxes the detector learns from and is scored on.

Annotations arrive separately from scans (a pathologist labels after the center uploads), so
they live under ``labels/<center>/<batch>/cells.parquet``, not inside the immutable batch. Boxes
are level-0 pixels of the slide, ``[x0, x1) x [y0, y1)``, one row per cell, with the class
name. A new annotation round replaces the file atomically; slide grades stay in the manifest.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from smartccs import layout
from smartccs.batches import BatchRef
from smartccs.errors import CCSError
from smartccs.ids import SlideKey
from smartccs.store import Store

CELLS_FILE = "cells.parquet"
REQUIRED = {"slide_id": pa.string(), "class": pa.string()}
BOX_COLUMNS = ("x0", "y0", "x1", "y1")


class LabelsError(CCSError):
    """An annotation file that cannot be used: missing columns, bad boxes, unknown slides."""


@dataclass(frozen=True)
class SlideBoxes:
    """One slide's annotated cells: level-0 xyxy boxes and class names."""

    boxes: np.ndarray  # (N, 4) float64
    classes: np.ndarray  # (N,) str

    def __len__(self) -> int:
        return len(self.classes)


"""(center, batch, slide_id): a slide id is unique only within its batch."""


def _validated(table: pa.Table, ref: BatchRef, source: str) -> pa.Table:
    for name in (*REQUIRED, *BOX_COLUMNS):
        if name not in table.column_names:
            raise LabelsError(f"{source}: missing column {name!r}")
    table = table.select([*REQUIRED, *BOX_COLUMNS]).cast(
        pa.schema([*(pa.field(k, t) for k, t in REQUIRED.items())])
        .append(pa.field("x0", pa.float64()))
        .append(pa.field("y0", pa.float64()))
        .append(pa.field("x1", pa.float64()))
        .append(pa.field("y1", pa.float64()))
    )
    if table.num_rows:
        bad = pc.or_(
            pc.less_equal(table["x1"], table["x0"]), pc.less_equal(table["y1"], table["y0"])
        )
        if pc.any(bad).as_py():
            row = pc.index(bad, True).as_py()
            raise LabelsError(f"{source}: row {row}: empty box (x1 <= x0 or y1 <= y0)")
    known = {s.slide_id for s in ref.manifest.slides}
    unknown = set(table["slide_id"].to_pylist()) - known
    if unknown:
        raise LabelsError(
            f"{source}: slide_id {sorted(unknown)[0]!r} is not in {ref.center}/{ref.batch}"
        )
    return table


def put_cell_labels(store: Store, ref: BatchRef, cells: pa.Table | str | Path) -> str:
    """Validate annotations against the batch's manifest and publish them atomically."""
    source = str(cells) if not isinstance(cells, pa.Table) else f"labels of {ref.center}"
    table = pq.read_table(cells) if not isinstance(cells, pa.Table) else cells
    table = _validated(table, ref, source)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    key = f"{layout.labels(ref.center, ref.batch)}/{CELLS_FILE}"
    store.write_bytes(key, buf.getvalue())
    return store.uri(key)


def has_cell_labels(store: Store, center: str, batch: str) -> bool:
    return store.exists(f"{layout.labels(center, batch)}/{CELLS_FILE}")


def load_cell_labels(store: Store, refs: Iterable[BatchRef]) -> dict[SlideKey, SlideBoxes]:
    """Every annotated slide of the batches; a batch without annotations is an error."""
    out: dict[SlideKey, SlideBoxes] = {}
    for ref in refs:
        key = f"{layout.labels(ref.center, ref.batch)}/{CELLS_FILE}"
        if not store.exists(key):
            raise LabelsError(
                f"{ref.center}/{ref.batch} has no cell annotations at {store.uri(key)}"
            )
        table = pq.read_table(io.BytesIO(store.read_bytes(key)))
        boxes = np.stack([table[c].to_numpy() for c in BOX_COLUMNS], axis=1).astype(np.float64)
        classes = np.asarray(table["class"].to_pylist(), dtype=object)
        slide_ids = np.asarray(table["slide_id"].to_pylist(), dtype=object)
        for s in ref.manifest.slides:  # every slide of an annotated batch, even with no cells
            mask = slide_ids == s.slide_id
            out[(ref.center, ref.batch, s.slide_id)] = SlideBoxes(boxes[mask], classes[mask])
    return out
