"""The ground-truth tables' schemas, and the per-cell table of one slide.

Training, metrics and tests read ``slides.parquet`` and ``cells.parquet``; their schemas (and
the metadata that marks them synthetic) are the contract, kept in one place. The per-slide
table is assembled by ``center_output``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from smartccs.synth.cell_geometry import cell_areas
from smartccs.synth.cell_table import CELL_KINDS, NORMAL_KINDS
from smartccs.synth.specimen import Specimen

TABLE_METADATA = {b"smartccs.synthetic": b"true", b"smartccs.schema_version": b"1"}


def count_column(kind: str) -> str:
    """The slides table's column counting cells of ``kind`` (``n_asc_us`` for ASC-US)."""
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
        *(pa.field(count_column(k), pa.int32(), nullable=False) for k in CELL_KINDS),
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


def cells_table(slide_id: str, specimen: Specimen, mpp: float, width: int, height: int) -> pa.Table:
    """One row per cell: class, group and box in level-0 pixels and microns."""
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
