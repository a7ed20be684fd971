"""A bounded local copy of slides that live in S3, shared by every process on a machine.

OpenSlide reads local files only, so a slide in an S3 store is downloaded once per machine
into ``<root>/<id[:2]>/<id>`` and reused by every worker there. The entry's id names the
object itself: its URI, the ETag S3 gave the version read (a HEAD per lookup) and the sha256
the manifest claims. A claimed hash alone is not a key: a center that stores other bytes
under a manifest claiming another center's sha256 would be handed that center's slide on a
hit, and a hit would tell it that slide was screened here. So a center only ever hits entries
made from its own object, and every entry was verified against the manifest's sha256 while
its bytes streamed in: a corrupt or substituted upload fails with its key named instead of
being screened. The total size is bounded; the least recently used entries are evicted first.

Concurrency across processes uses ``fcntl`` locks: one per entry (a second process asking
for the same slide waits for the first download instead of starting another) and one for
eviction (space is reserved, as a full-size sparse temp file, under that lock, so concurrent
downloads cannot overshoot the bound). Deleting an entry another process has open is not
always safe: OpenSlide 4 reopens TIFF-based files (SVS, generic TIFF) by path on every read,
so a handle to an evicted entry fails its next read that its own tile cache does not answer
(the review viewer, smartccs.slide.deepzoom, reopens through the cache and retries; the
screening reader reopens a slide whose file is gone before it reads, and counts a tile that
still fails as failed). Keep the bound well above the slides in flight.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from smartccs.errors import CCSError, SlideError
from smartccs.store import Store

CHUNK = 8 * 2**20
DEFAULT_MAX_BYTES = 50 * 2**30

_SHA_RE = re.compile(r"[0-9a-f]{64}")  # fullmatch: `$` also takes a trailing newline
_EVICT_LOCK = ".evict.lock"


@dataclass(frozen=True)
class _Entry:
    path: Path
    size: int
    used: float  # mtime: set on download and on every hit


def default_root() -> str:
    """Where slides are cached on this node: ``CCS_SLIDE_CACHE`` or ``~/.cache/smartccs/slides``."""
    return os.environ.get("CCS_SLIDE_CACHE") or "~/.cache/smartccs/slides"


def default_max_bytes() -> int:
    """The cache bound: ``CCS_SLIDE_CACHE_GB`` gibibytes, or ``DEFAULT_MAX_BYTES``."""
    gb = os.environ.get("CCS_SLIDE_CACHE_GB")
    if not gb:
        return DEFAULT_MAX_BYTES
    try:
        value = float(gb)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise CCSError(f"CCS_SLIDE_CACHE_GB={gb!r}: expected a positive number of gibibytes")
    return int(value * 2**30)


class SlideCache:
    """Local copies of store slides, at most ``max_bytes`` in total under ``root``."""

    def __init__(self, root: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.root = Path(root).expanduser()
        self.max_bytes = max_bytes

    def __repr__(self) -> str:
        return f"SlideCache({str(self.root)!r}, max_bytes={self.max_bytes})"

    @classmethod
    def from_env(cls) -> SlideCache:
        """``CCS_SLIDE_CACHE`` (default ``~/.cache/smartccs/slides``), ``CCS_SLIDE_CACHE_GB``."""
        return cls(default_root(), default_max_bytes())

    def local_path(self, store: Store, key: str, sha256: str | None, size: int | None) -> Path:
        """A local file with the content of ``key``; downloaded (and verified) if needed.

        ``sha256`` and ``size`` come from the manifest. A local store's file is returned in
        place (no copy; its size is checked, hashing a slide on every open would cost more
        than reading it). Without a ``sha256`` (inspecting an arbitrary object) the object's
        bytes are cached as they are, checked against nothing.
        """
        uri = store.uri(key)
        if store.protocol == "file":
            return _local_file(Path(store.path(key)), uri, size)
        if sha256 is not None and not _SHA_RE.fullmatch(sha256):
            raise SlideError(f"{uri}: invalid sha256 {sha256!r} (64 lower-case hex digits)")
        actual, etag = _remote_identity(store, key, uri)
        if size is None:
            size = actual
        elif actual != size:
            raise SlideError(
                f"{uri}: {actual} bytes in the store, the manifest says {size}: "
                "the object changed or the manifest is wrong"
            )
        if size > self.max_bytes:
            raise SlideError(
                f"{uri}: {size / 2**30:.2f} GiB does not fit in the slide cache "
                f"({self.max_bytes / 2**30:.2f} GiB at {self.root}); raise CCS_SLIDE_CACHE_GB"
            )
        entry = self._entry(_object_id(uri, etag, size, sha256))
        if self._hit(entry, size):
            return entry
        with self._locked(entry):
            if self._hit(entry, size):  # another process downloaded it while we waited
                return entry
            self._download(store, key, uri, sha256, size, entry)
        return entry

    def mark_used(self, path: Path) -> None:
        """Count a read of ``path`` as a use (evicted last) when it is one of this cache's
        entries: a reader that keeps a slide open (the review viewer) reads it without asking
        :meth:`local_path` again, and its slide would otherwise age out under screening's
        downloads while a cytologist pans it. A local store's own files are never touched."""
        if path.is_relative_to(self.root):
            with contextlib.suppress(FileNotFoundError):
                _touch(path)

    # --- entries ----------------------------------------------------------------------------
    def _entry(self, name: str) -> Path:
        return self.root / name[:2] / name

    @staticmethod
    def _hit(entry: Path, size: int) -> bool:
        try:
            if entry.stat().st_size != size:
                return False
            _touch(entry)  # most recently used: evicted last
        except FileNotFoundError:
            return False
        return True

    def entries(self) -> list[_Entry]:
        """Complete entries, least recently used first."""
        found = []
        for path in self._files():
            if _SHA_RE.fullmatch(path.name):
                with contextlib.suppress(FileNotFoundError):
                    st = path.stat()
                    found.append(_Entry(path, st.st_size, st.st_mtime))
        return sorted(found, key=lambda e: e.used)

    def total_bytes(self) -> int:
        """Bytes held, counting the full size of downloads in progress."""
        total = 0
        for path in self._files():
            if not path.name.endswith(".lock"):
                with contextlib.suppress(FileNotFoundError):
                    total += path.stat().st_size
        return total

    def _files(self) -> Iterator[Path]:
        if not self.root.is_dir():
            return
        for sub in self.root.iterdir():
            if sub.is_dir() and len(sub.name) == 2:
                yield from sub.iterdir()

    # --- download ---------------------------------------------------------------------------
    def _download(
        self, store: Store, key: str, uri: str, sha256: str | None, size: int, entry: Path
    ) -> str:
        """Stream ``key`` into ``entry`` (caller holds its lock); return the sha256 seen."""
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f"{entry.name}.part-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with _flock(self.root / _EVICT_LOCK):
                self._evict(size)
                with open(tmp, "wb") as f:
                    f.truncate(size)  # reserve the space in everyone's accounting
            digest = hashlib.sha256()
            seen = 0
            with store.open_input(key) as src, open(tmp, "r+b") as dst:
                while chunk := src.read(CHUNK):
                    seen += len(chunk)
                    if seen > size:
                        break
                    digest.update(chunk)
                    dst.write(chunk)
            if seen != size:
                got_bytes = f"more than {size}" if seen > size else f"only {seen}"
                raise SlideError(
                    f"{uri}: {got_bytes} bytes in the object, expected {size}: "
                    "the object changed or the manifest is wrong"
                )
            got = digest.hexdigest()
            if sha256 is not None and got != sha256:
                raise SlideError(
                    f"{uri}: sha256 mismatch: the manifest says {sha256[:12]}..., the object "
                    f"hashes to {got[:12]}...: corrupt or replaced upload"
                )
            os.replace(tmp, entry)
            _touch(entry)
            return got
        except FileNotFoundError:
            raise SlideError(f"{uri}: not found in the store") from None
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise SlideError(f"{uri}: no space left on the slide cache's disk") from None
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    # --- eviction ---------------------------------------------------------------------------
    def _evict(self, incoming: int) -> None:
        """Delete least recently used entries until ``incoming`` more bytes fit.

        Called under the eviction lock. Entries and temp files whose lock is held (being
        downloaded or filed) are left alone, so the bound can be overshot by what concurrent
        downloads reserved; a temp file or lock whose lock is free was left by a process that
        died mid-download, and is removed.
        """
        for path in list(self._files()):
            if _SHA_RE.fullmatch(path.name):
                continue
            # a temp file or lock: its owner's lock is free only if the owner died
            owner = path.with_name(path.name.split(".part-")[0].removesuffix(".lock"))
            with self._locked(owner, blocking=False) as got:
                if got and not path.name.endswith(".lock"):
                    path.unlink(missing_ok=True)
        total = self.total_bytes()
        for e in self.entries():
            if total + incoming <= self.max_bytes:
                return
            with self._locked(e.path, blocking=False) as got:
                if got:
                    e.path.unlink(missing_ok=True)
                    total -= e.size

    # --- locks ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, entry: Path, *, blocking: bool = True) -> Iterator[bool]:
        """Hold the entry's lock; the lock file is deleted on release, so none accumulate."""
        lock = entry.with_name(entry.name + ".lock")
        with _flock(lock, blocking=blocking) as got:
            try:
                yield got
            finally:
                if got:
                    lock.unlink(missing_ok=True)


@contextlib.contextmanager
def _flock(lock: Path, *, blocking: bool = True) -> Iterator[bool]:
    """An exclusive ``flock`` on ``lock``, safe against its holder deleting the file.

    A process that opened the file just before its holder unlinked it would lock an orphan
    inode; so after locking, the inode is compared with what the path now names, and on a
    mismatch the lock is taken again on the new file.
    """
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            yield False
            return
        try:
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        yield True
    finally:
        os.close(fd)  # releases the lock


def _touch(path: Path) -> None:
    """Mark as just used, at full clock resolution (file times otherwise tick every few ms)."""
    now = time.time_ns()
    os.utime(path, ns=(now, now))


def _local_file(path: Path, uri: str, size: int | None) -> Path:
    try:
        actual = path.stat().st_size
    except FileNotFoundError:
        raise SlideError(f"{uri}: not found in the store") from None
    if size is not None and actual != size:
        raise SlideError(
            f"{uri}: {actual} bytes on disk, the manifest says {size}: "
            "an incomplete copy or the wrong file"
        )
    return path


def _remote_identity(store: Store, key: str, uri: str) -> tuple[int, str]:
    """(size, ETag) of the object as it is now: a fresh HEAD, never s3fs's cached listing."""
    path = store.path(key)
    store.fs.invalidate_cache(path)
    try:
        info = store.fs.info(path)
    except FileNotFoundError:
        raise SlideError(f"{uri}: not found in the store") from None
    etag = str(info.get("ETag") or info.get("etag") or "")
    if not etag:
        raise SlideError(f"{uri}: the store gave no ETag, so a cached copy cannot be tied to it")
    return int(info["size"]), etag


def _object_id(uri: str, etag: str, size: int, sha256: str | None) -> str:
    """The cache entry's name: one object version, as read, verified against one claim."""
    return hashlib.sha256(f"{uri}\n{etag}\n{size}\n{sha256 or ''}".encode()).hexdigest()
