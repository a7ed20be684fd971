"""The commit-marker protocol that batches and model versions share (docs/store.md).

A prefix becomes visible when its ``_COMMITTED`` marker exists; the marker's record pins the
sha256 of the object that describes the prefix (a manifest, a model card), so that object
cannot change after the commit without readers noticing.
"""

from __future__ import annotations

import hashlib
from typing import TypeVar

from pydantic import BaseModel

from smartccs import layout
from smartccs.errors import StoreError
from smartccs.store import Store

Record = TypeVar("Record", bound=BaseModel)


def read_commit(store: Store, prefix: str, record_type: type[Record], what: str) -> Record:
    """The commit record of ``prefix``; an uncommitted prefix is an error naming ``what``."""
    try:
        data = store.read_bytes(prefix, layout.COMMIT_MARKER)
    except StoreError:
        raise StoreError(
            f"{store.uri(prefix)} is not a committed {what} (no {layout.COMMIT_MARKER} marker)"
        ) from None
    return record_type.model_validate_json(data)


def read_pinned(
    store: Store,
    prefix: str,
    name: str,
    sha256: str,
    what: str,
    error: type[Exception] = StoreError,
) -> bytes:
    """``prefix/name``, refused with ``error`` if it changed since the commit pinned ``sha256``."""
    data = store.read_bytes(prefix, name)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise error(f"{store.uri(prefix, name)} changed after the {what} was committed")
    return data


def copy_committed(src: Store, dst: Store, prefix: str) -> bool:
    """Copy a committed prefix (a batch, a model version) byte for byte into another store,
    its marker last, so ``dst`` never shows it half-copied; False if ``dst`` already has it."""
    if dst.exists(prefix, layout.COMMIT_MARKER):
        return False
    keys = src.list(prefix)
    if f"{prefix.rstrip('/')}/{layout.COMMIT_MARKER}" not in keys:
        raise StoreError(f"{src.uri(prefix)} is not committed: nothing to copy")
    keys.sort(key=lambda k: k.endswith(layout.COMMIT_MARKER))
    for key in keys:
        dst.write_bytes(key, src.read_bytes(key))
    return True
