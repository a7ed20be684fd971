"""Cell detection in an evaluation: the kept cells of the ``cells`` table against annotated
abnormal cells, as per-class AP (``smartccs.metrics.detection``).

The cells table holds only the top-K kept abnormal cells per class of each slide, so this is
the AP of the kept cells, recall-capped by K, not the detector's AP over all its detections.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from smartccs.evaluation.tables import EvaluationError, key_name, require
from smartccs.ids import SlideKey
from smartccs.labels import SlideBoxes
from smartccs.metrics.detection import Boxes, DetectionReport, detection_report
from smartccs.taxonomy import ABNORMAL_CLASSES

__all__ = ["CELL_COLUMNS", "DETECTION_NOTE", "CellRows", "DetectionResult", "detection_result"]

DETECTION_NOTE = (
    "AP of the kept cells: the cells table holds the top-K abnormal cells per class of each "
    "slide, so recall is capped by K; this is not the detector's AP over all its detections."
)

CELL_COLUMNS = ("center", "batch", "slide_id", "cell_class", "score", "x0", "y0", "x1", "y1")


class DetectionResult(BaseModel):
    """Per-class AP of the kept cells on a group's annotated, scored slides."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="null")

    n_slides: int = Field(ge=1, description="scored slides with cell annotations")
    report: DetectionReport
    note: str = DETECTION_NOTE


class CellRows:
    """The cells table's rows as Boxes over slide keys ``center/batch/slide_id``."""

    def __init__(self, cells: pa.Table):
        require(cells, CELL_COLUMNS, "cells")
        ids = pc.binary_join_element_wise(
            cells["center"].cast(pa.string()),
            cells["batch"].cast(pa.string()),
            cells["slide_id"].cast(pa.string()),
            "/",
        )
        self.ids = ids
        labels = pc.index_in(cells["cell_class"], value_set=pa.array(ABNORMAL_CLASSES))
        if labels.null_count:
            row = pc.index(pc.is_null(labels), True).as_py()
            raise EvaluationError(
                f"the cells table's row {row} has cell_class {cells['cell_class'][row].as_py()!r}, "
                f"not one of {', '.join(ABNORMAL_CLASSES)}"
            )
        self.labels = labels.to_numpy(zero_copy_only=False).astype(np.int64)
        self.boxes = np.stack(
            [cells[c].to_numpy(zero_copy_only=False).astype(np.float64) for c in CELL_COLUMNS[5:]],
            axis=1,
        ).reshape(-1, 4)
        self.scores = cells["score"].to_numpy(zero_copy_only=False).astype(np.float64)

    def for_slides(self, names: set[str]) -> Boxes:
        """The kept cells of the slides named ``center/batch/slide_id``."""
        selected = pc.is_in(self.ids, value_set=pa.array(sorted(names), pa.string()))
        mask = selected.to_numpy(zero_copy_only=False).astype(bool)
        ids = np.asarray(pc.filter(self.ids, selected).to_pylist(), dtype=str)
        return Boxes(ids, self.boxes[mask], self.labels[mask], self.scores[mask])


def _truth_boxes(cell_truth: Mapping[SlideKey, SlideBoxes], keys: list[SlideKey]) -> Boxes:
    ids: list[str] = []
    boxes: list[np.ndarray] = []
    labels: list[int] = []
    index = {c: i for i, c in enumerate(ABNORMAL_CLASSES)}
    for key in keys:
        sb = cell_truth[key]
        classes = np.asarray(sb.classes, dtype=object)
        keep = np.fromiter((c in index for c in classes), dtype=bool, count=len(classes))
        if not keep.any():
            continue
        boxes.append(np.asarray(sb.boxes, dtype=np.float64).reshape(-1, 4)[keep])
        labels.extend(index[c] for c in classes[keep])
        ids.extend([key_name(key)] * int(keep.sum()))
    if not ids:
        return Boxes(np.array([], dtype=str), np.zeros((0, 4)), np.array([], dtype=np.int64))
    return Boxes(np.array(ids, dtype=str), np.concatenate(boxes), np.array(labels))


def detection_result(
    cells: CellRows,
    cell_truth: Mapping[SlideKey, SlideBoxes] | None,
    scored_keys: list[SlideKey],
    iou: float,
) -> tuple[DetectionResult | None, str | None]:
    """AP of the kept cells on the scored slides that have annotations, or why there is none."""
    if not cell_truth:
        return None, "no cell annotations (labels/<center>/<batch>/cells.parquet)"
    keys = [k for k in scored_keys if k in cell_truth]
    if not keys:
        return None, "none of the scored slides has cell annotations"
    pred = cells.for_slides({key_name(k) for k in keys})
    gt = _truth_boxes(cell_truth, keys)
    rep = detection_report(pred, gt, ABNORMAL_CLASSES, iou)
    return DetectionResult(n_slides=len(keys), report=rep), None
