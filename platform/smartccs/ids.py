"""Ids that become path segments in the store (center, batch, slide, model, run)."""

import re
from typing import Annotated

from pydantic import AfterValidator

from smartccs.errors import InvalidIdError

SlideKey = tuple[str, str, str]
"""(center, batch, slide_id): one slide, the same key in bags, labels, splits and evaluation."""


def batch_key(center: str, batch: str) -> str:
    """``center/batch``: how a batch is named in logs, adaptation state and service ids."""
    return f"{center}/{batch}"


ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
"""An id's characters (``validate_id`` also refuses ``..``), for patterns that embed one."""
_ID_RE = re.compile(ID_PATTERN)
"""Matched with ``fullmatch``: ``$`` would also accept a trailing newline."""


def validate_id(value: str, field: str = "id") -> str:
    """Return ``value`` if it is a safe single path segment, else raise naming ``field``.

    Ids end up in S3 keys and local paths, so anything that could climb (``..``), nest (``/``)
    or hide (leading ``.``/``_``, which Parquet readers skip) is refused.
    """
    if not isinstance(value, str) or not _ID_RE.fullmatch(value) or ".." in value:
        raise InvalidIdError(
            f"invalid {field} {value!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, no '..'"
        )
    return value


def _check(value: str) -> str:
    try:
        return validate_id(value)
    except InvalidIdError as exc:  # pydantic reports ValueError with the field path
        raise ValueError(str(exc).replace("invalid id ", "invalid ")) from None


Id = Annotated[str, AfterValidator(_check)]
"""A pydantic field type for ids."""
