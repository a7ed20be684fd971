"""Reading the evaluation's input tables: column checks, slide keys, the truth map.

Shared by :mod:`smartccs.evaluation.report` (slides, truth) and
:mod:`smartccs.evaluation.detection` (cells), so each refuses a malformed table the same way:
one :class:`EvaluationError` naming the table, the column or the slide.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from smartccs.errors import CCSError
from smartccs.ids import SlideKey
from smartccs.taxonomy import GRADES

__all__ = ["EvaluationError", "SlideKey", "column", "key_name", "one_value", "require", "truth_map"]


class EvaluationError(CCSError):
    """Results that cannot be evaluated as asked: mixed models, missing columns, bad rows."""


def require(table: pa.Table, columns: tuple[str, ...], what: str) -> None:
    """Refuse a table without one of ``columns``, naming it and what the table has."""
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise EvaluationError(
            f"the {what} table has no column {missing[0]!r} (it has: "
            f"{', '.join(table.column_names) or 'none'})"
        )


def column(table: pa.Table, name: str) -> list[Any]:
    """A column as a list; all None when the table lacks it (optional columns)."""
    if name not in table.column_names:
        return [None] * table.num_rows
    return table[name].to_pylist()


def key_name(key: SlideKey) -> str:
    """``center/batch/slide_id``, as messages and the cells' slide ids write a slide."""
    return "/".join(key)


def truth_map(truth: pa.Table) -> dict[SlideKey, str]:
    """Slide key -> true grade; a grade outside GRADES or two grades for a slide are errors."""
    require(truth, ("center", "batch", "slide_id", "grade"), "truth")
    out: dict[SlideKey, str] = {}
    for c, b, s, g in zip(
        *(column(truth, n) for n in ("center", "batch", "slide_id", "grade")), strict=True
    ):
        key = (str(c), str(b), str(s))
        if g not in GRADES:
            raise EvaluationError(f"truth for {key_name(key)}: grade {g!r} is not one of GRADES")
        if key in out and out[key] != g:
            raise EvaluationError(f"truth for {key_name(key)}: two grades, {out[key]} and {g}")
        out[key] = g
    return out


def one_value(values: list[Any], what: str, hint: str) -> Any:
    """The one non-null value of ``values`` (None if none); several are refused with ``hint``:
    numbers pooled over two models describe neither."""
    distinct = sorted({v for v in values if v is not None}, key=str)
    if len(distinct) > 1:
        shown = ", ".join(str(v) for v in distinct[:5])
        raise EvaluationError(f"the results hold several {what} ({shown}): {hint}")
    return distinct[0] if distinct else None
