"""sha256 of files and streams, read in chunks so a multi-GB slide never sits in memory."""

import hashlib
from pathlib import Path
from typing import BinaryIO

CHUNK = 8 << 20


def sha256_stream(f: BinaryIO) -> str:
    h = hashlib.sha256()
    while chunk := f.read(CHUNK):
        h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f)


def data_sha256(manifest_sha256s: list[str]) -> str:
    """One hash for a training set: sha256 of its batches' sorted manifest sha256s."""
    return hashlib.sha256("\n".join(sorted(manifest_sha256s)).encode()).hexdigest()
