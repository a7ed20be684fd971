"""The ``slides`` and ``cells`` tables' columns, typed and versioned (docs/results.md).

Both tables are Hive-partitioned by ``center`` and ``batch``: those two columns live in the
directory names (``results/<table>/center=<c>/batch=<b>/``), not in the files, which is what
DuckDB, pandas, pyarrow, Spark and Athena all expect. A reader that must know the version finds
it in each file's metadata (``smartccs.schema_version``) and in the partition's commit record.
Adding a nullable column bumps the minor version; anything else bumps the major one.

The ``reviews`` table (cytologists' sign-offs, ``smartccs.results.reviews``) is defined last,
with a version of its own.
"""

from __future__ import annotations

import pyarrow as pa

from smartccs.taxonomy import ABNORMAL_CLASSES, GRADES

SCHEMA_VERSION = "1.1"
TABLES = ("slides", "cells")
PARTITION_COLUMNS = ("center", "batch")

STATUS_SCREENED = "screened"
STATUS_INADEQUATE = "inadequate"
STATUS_FAILED = "failed"
STATUS_REJECTED = "rejected"
SLIDE_STATUSES = (STATUS_SCREENED, STATUS_INADEQUATE, STATUS_FAILED, STATUS_REJECTED)
"""``screened``: scored. ``inadequate``: scored, but too few squamous cells for a reliable
call (Bethesda adequacy), so the score must not be read as negative. ``failed``: no score;
``error`` says why (unreadable file, no mpp, every tile failed). ``rejected``: not a cervical
cytology preparation (blank glass, a tissue section, almost no cells: ``slide.specimen``),
so never scored and never negative; ``error`` says what was measured."""


THRESHOLD_VALIDATION = "validation"
THRESHOLD_CENTER = "center"
THRESHOLD_SOURCES = (THRESHOLD_VALIDATION, THRESHOLD_CENTER)
"""Where a slide's ``threshold`` came from. ``validation``: the one stored with the classifier,
chosen on its validation slides. ``center``: that operating point carried to the slide's
center through the score distribution of the unlabelled slides screened there
(``screening.threshold``); ``threshold_slides`` says how many slides it was estimated from."""


def grade_column(grade: str) -> str:
    """``p_nilm``, ``p_asc_us``, ...: the probability column of one of the 7 grades."""
    return "p_" + grade.lower().replace("-", "_")


PROB_COLUMNS = tuple(grade_column(g) for g in GRADES)

_UTC = pa.timestamp("us", tz="UTC")

SLIDES = pa.schema(
    [
        pa.field("slide_id", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        *[pa.field(c, pa.float32()) for c in PROB_COLUMNS],
        pa.field("score", pa.float32(), metadata={"doc": "1 - P(NILM)"}),
        pa.field("predicted_grade", pa.string()),
        pa.field("threshold", pa.float32(), metadata={"doc": "operating point of the model"}),
        pa.field("positive", pa.bool_(), metadata={"doc": "score >= threshold"}),
        pa.field(
            "threshold_source",
            pa.string(),
            metadata={"doc": "validation (stored with the model) or center (carried there)"},
        ),
        pa.field(
            "threshold_slides",
            pa.int32(),
            metadata={"doc": "center's unlabelled slides the threshold was carried with"},
        ),
        pa.field("n_tiles", pa.int32(), metadata={"doc": "planned foreground tiles"}),
        pa.field("tiles_read", pa.int32()),
        pa.field("tiles_failed", pa.int32()),
        pa.field("n_cells", pa.int32(), metadata={"doc": "abnormal cells kept (cells table)"}),
        pa.field("n_squamous", pa.int64(), metadata={"doc": "estimated squamous cells"}),
        pa.field("adequate", pa.bool_()),
        pa.field("slide_mpp", pa.float32()),
        pa.field("background_fraction", pa.float32(), metadata={"doc": "mean over read tiles"}),
        pa.field("blur", pa.float32(), metadata={"doc": "mean tile sharpness (QC)"}),
        pa.field("detector", pa.string(), metadata={"doc": "model name/version"}),
        pa.field("classifier", pa.string()),
        pa.field("encoder", pa.string()),
        pa.field("adaptation", pa.string(), metadata={"doc": "adapter state version or null"}),
        pa.field(
            "screen_seconds",
            pa.float32(),
            metadata={"doc": "worker compute spent on the slide: read, detect, crop, embed"},
        ),
        pa.field("screened_at", _UTC, nullable=False),
    ],
    metadata={"smartccs.table": "slides", "smartccs.schema_version": SCHEMA_VERSION},
)

CELLS = pa.schema(
    [
        pa.field("slide_id", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("cell_class", pa.string(), nullable=False),
        pa.field("rank", pa.int16(), nullable=False, metadata={"doc": "0 = top of its class"}),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("x0", pa.float64(), nullable=False, metadata={"doc": "level-0 px"}),
        pa.field("y0", pa.float64(), nullable=False),
        pa.field("x1", pa.float64(), nullable=False),
        pa.field("y1", pa.float64(), nullable=False),
        pa.field("width_um", pa.float32()),
        pa.field("height_um", pa.float32()),
    ],
    metadata={"smartccs.table": "cells", "smartccs.schema_version": SCHEMA_VERSION},
)

SCHEMAS: dict[str, pa.Schema] = {"slides": SLIDES, "cells": CELLS}

REVIEWS_TABLE = "reviews"
REVIEWS_SCHEMA_VERSION = "1.0"
"""The ``reviews`` table's own version: cytologists' sign-offs are appended, never rewritten,
so its files outlive any number of slides/cells versions and are versioned apart from them."""

UNSATISFACTORY = "unsatisfactory"
REVIEW_CATEGORIES = (*GRADES, UNSATISFACTORY)
"""What a cytologist signs a slide out as: one of the 7 grades, or unsatisfactory for
evaluation (Bethesda), which is no grade at all."""

NOT_A_CELL = "not_a_cell"
CORRECTION_VERDICTS = (*ABNORMAL_CLASSES, NOT_A_CELL)
"""A reviewer's verdict on one cell the model kept: the abnormal class it really is (the
model's own class to confirm it), or not a cell at all (debris, an overlap, a stain artefact)."""

CORRECTION = pa.struct(
    [
        pa.field("cell_class", pa.string(), nullable=False),
        pa.field("rank", pa.int16(), nullable=False),
        pa.field("x0", pa.float64(), nullable=False),
        pa.field("y0", pa.float64(), nullable=False),
        pa.field("x1", pa.float64(), nullable=False),
        pa.field("y1", pa.float64(), nullable=False),
        pa.field("verdict", pa.string(), nullable=False),
    ]
)
"""One corrected row of the ``cells`` table: its class, rank and level-0 box as the reviewer
saw them, and the reviewer's verdict."""

REVIEWS = pa.schema(
    [
        pa.field("review_id", pa.string(), nullable=False),
        pa.field("slide_id", pa.string(), nullable=False),
        pa.field("reviewer", pa.string(), nullable=False),
        pa.field("reviewed_at", _UTC, nullable=False),
        pa.field(
            "category", pa.string(), nullable=False, metadata={"doc": "a grade or unsatisfactory"}
        ),
        pa.field("comment", pa.string()),
        pa.field("corrections", pa.list_(CORRECTION)),
        pa.field("run_id", pa.string(), metadata={"doc": "the screening run reviewed"}),
        pa.field("classifier", pa.string()),
        pa.field("detector", pa.string()),
        pa.field("encoder", pa.string()),
        pa.field("adaptation", pa.string()),
        pa.field("score", pa.float32(), metadata={"doc": "the slide score the reviewer saw"}),
    ],
    metadata={"smartccs.table": REVIEWS_TABLE, "smartccs.schema_version": REVIEWS_SCHEMA_VERSION},
)
"""One row per sign-off, appended as a file of its own (``smartccs.results.reviews``)."""
