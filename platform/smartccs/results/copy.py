"""Copying a batch's committed result partitions into another store, commits and all.

The study screens each arm in a store of its own and then publishes one arm's partitions at
the main store's top level (``smartccs.study.publish``), where the README's readers look.
"""

from __future__ import annotations

import hashlib

from smartccs import layout
from smartccs.results.tables import _WRITE_ORDER, PART_NAME, ResultsError, read_commit
from smartccs.store import Store


def copy_batch_results(src: Store, dst: Store, center: str, batch: str) -> bool:
    """Copy the batch's committed partitions of both tables, with their commit record, from
    ``src`` into ``dst`` byte for byte: files first, then markers (cells before slides, as a
    write goes), so ``dst`` never shows them half-copied.

    Committed results are never replaced: if ``dst`` already has a committed run for the batch
    (its own, or this copy made before) nothing is written and the answer is False. The files
    are checked against ``src``'s commit before anything is written.
    """
    if read_commit(dst, center, batch) is not None:
        return False
    commit = read_commit(src, center, batch)
    if commit is None:
        raise ResultsError(f"no committed results for {center}/{batch} in {src.uri('results')}")
    files = {}
    for table in _WRITE_ORDER:
        prefix = layout.results(table, center, batch)
        data = src.read_bytes(prefix, PART_NAME)
        if hashlib.sha256(data).hexdigest() != commit.tables[table].sha256:
            raise ResultsError(
                f"{src.uri(prefix, PART_NAME)} is not the file run {commit.run_id} committed"
            )
        files[table] = data
    record = commit.model_dump_json(indent=2).encode()
    for table in _WRITE_ORDER:
        dst.write_bytes(f"{layout.results(table, center, batch)}/{PART_NAME}", files[table])
    for table in _WRITE_ORDER:
        marker = layout.result_commit(table, center, batch)
        dst.write_bytes(f"{marker}/{layout.COMMIT_MARKER}", record)
    return True
