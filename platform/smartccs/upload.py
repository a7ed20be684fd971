"""The screening center's door: validate a folder of slides, upload it as one committed batch.

Every file is checked before a byte is sent (OpenSlide opens it, its mpp is known, its tiles
decode as ``ccs inspect`` reads them, its checksum matches the manifest when one is given), so
a bad file costs the center one clear message and never a partial batch in the store.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from smartccs import layout
from smartccs.batches import (
    UPLOAD_LEASE,
    BatchRef,
    UploadLease,
    commit_batch,
    is_committed,
    load_batch,
)
from smartccs.checksums import sha256_file
from smartccs.errors import (
    AlreadyCommittedError,
    CCSError,
    InvalidIdError,
    ManifestError,
    SlideError,
    StoreError,
    printable,
)
from smartccs.faults import fault_point
from smartccs.ids import validate_id
from smartccs.manifest import MANIFEST_NAME, Manifest, SlideEntry
from smartccs.store import Store

if TYPE_CHECKING:
    from smartccs.slide.inspect import Pixels
    from smartccs.slide.reader import Slide, SlideInfo

log = logging.getLogger(__name__)


class UploadError(CCSError):
    """One or more files of a batch cannot be uploaded; nothing was uploaded."""


def _pixels(slide: Slide) -> Pixels | None:
    """The slide's pixels read as ``ccs inspect`` reads them (``read_pixels``: the planner's
    mask level whole, then one tile per level), for what screening's specimen guard will make
    of it. A tile that cannot be decoded is a ``SlideError``, a problem like any unreadable
    file: batches are immutable, so a damaged scan is refused before it is one. Anything else
    going wrong only costs the warnings (None), never a center its upload."""
    from smartccs.slide.inspect import read_pixels
    from smartccs.slide.tiling import TilingConfig

    try:
        return read_pixels(slide, TilingConfig())
    except SlideError:
        raise
    except Exception as exc:  # a measurement that failed: the upload's checks are the file's
        log.debug("pixels not measured: %s", type(exc).__name__)
        return None


def _check_manifest_ids(directory: str | Path, center: str, batch: str) -> None:
    """Refuse a folder whose manifest is for another center than the upload's: the center
    decides who may read the batch and which adaptation screens it, so a mix-up there is never
    a rename. The batch id may differ (``--batch`` names this upload of the folder)."""
    manifest_path = Path(directory) / MANIFEST_NAME
    if not manifest_path.is_file():
        return
    given = Manifest.loads(manifest_path.read_bytes(), str(manifest_path))
    center = validate_id(center, "center")
    validate_id(batch, "batch")
    if given.center != center:
        raise UploadError(
            f"{manifest_path} says center {given.center!r}, but this upload is for center "
            f"{center!r}; nothing uploaded: correct --center or the manifest"
        )


_Candidate = tuple[SlideEntry | None, str, str]
"""A file to validate: its entry in the folder's manifest (None without one), slide id, path."""


def _candidates(directory: str | Path, root: Path) -> tuple[list[_Candidate], list[str]]:
    """The slides to validate, from the folder's manifest or else its files, and the problems
    found in listing them (broken links, bad or repeated slide ids)."""
    problems: list[str] = []
    candidates: list[_Candidate] = []
    manifest_path = root / MANIFEST_NAME
    if manifest_path.exists():
        given = Manifest.loads(manifest_path.read_bytes(), str(manifest_path))
        return [(s, s.slide_id, s.path) for s in given.slides], problems
    files, unreadable = _folder_files(root)
    problems += unreadable
    if not files and not unreadable:
        raise UploadError(f"{directory}: no slide files and no {MANIFEST_NAME}")
    for p in files:
        stem = p.name.split(".", 1)[0]
        try:
            candidates.append((None, validate_id(stem, "slide id"), p.name))
        except InvalidIdError as exc:
            problems.append(f"{printable(p.name)}: {exc}")
    ids = [sid for _, sid, _ in candidates]
    problems += [
        f"slide id {sid!r} is used by more than one file"
        for sid in sorted({i for i in ids if ids.count(i) > 1})
    ]
    return candidates, problems


def _log_slide(slide_id: str, info: SlideInfo, pixels: Pixels | None) -> None:
    """What the upload saw of a valid slide, and a warning when it is no cytology specimen."""
    # by slide id: a file name may carry what a center should not log (a patient's name)
    log.debug(
        "slide %s: %s, %dx%d, %.4f mpp",
        slide_id,
        info.vendor,
        info.width,
        info.height,
        info.mpp,
    )
    specimen = pixels.specimen if pixels else None
    if specimen is not None and specimen.kind != "cytology":
        log.warning(
            "slide %s is not a cervical cytology preparation; it is uploaded, but screening "
            "will reject it: %s",
            slide_id,
            specimen.reason,
        )


def _validate_slide(root: Path, candidate: _Candidate) -> SlideEntry | str:
    """One file's manifest entry, or the problem that keeps it out of the batch: not a file,
    unreadable, changed while read, or not what the folder's manifest says."""
    from smartccs.slide.reader import open_slide

    given_entry, slide_id, rel = candidate
    path = root / rel
    missing = _not_a_file(path)
    if missing:
        return f"{rel}: listed in {MANIFEST_NAME} but {missing}"
    before = _identity(path)
    size = before[0]
    try:
        mpp = given_entry.mpp if given_entry else None
        with open_slide(path, mpp_override=mpp, name=rel) as slide:
            info = slide.info
            pixels = _pixels(slide)
        digest = sha256_file(path)
    except CCSError as exc:
        return str(exc) if str(exc).startswith(rel) else f"{rel}: {exc}"
    if _identity(path) != before:
        return f"{rel}: changed while it was being validated; upload again"
    if given_entry is not None:
        if given_entry.sha256 != digest:
            return f"{rel}: sha256 does not match {MANIFEST_NAME}"
        if given_entry.bytes != size:
            return f"{rel}: {size} bytes, {MANIFEST_NAME} says {given_entry.bytes}"
    _log_slide(slide_id, info, pixels)
    return SlideEntry(
        slide_id=slide_id,
        path=rel,
        sha256=digest,
        bytes=size,
        mpp=given_entry.mpp if given_entry else None,
        grade=given_entry.grade if given_entry else None,
    )


def prepare_batch(
    directory: str | Path, center: str, batch: str, *, progress: bool = True
) -> tuple[Manifest, Path]:
    """Validate a local batch folder and return its manifest (for ``center``/``batch``).

    With a ``manifest.json`` in the folder its slide ids, paths, mpp overrides and grades are
    kept and its checksums verified; without one, every visible file at the top level is a
    slide whose id is its file name without extension. The manifest's center and batch are
    replaced by ``center`` and ``batch`` (see ``check_manifest`` of :func:`upload_batch`).
    """
    center = validate_id(center, "center")
    batch = validate_id(batch, "batch")
    root = Path(directory)
    if not root.is_dir():
        raise UploadError(f"{directory}: not a directory")
    candidates, problems = _candidates(directory, root)
    entries: list[SlideEntry] = []
    bar = tqdm(
        candidates, desc="validating slides", unit="slide", disable=None if progress else True
    )
    for candidate in bar:
        checked = _validate_slide(root, candidate)
        if isinstance(checked, str):
            problems.append(checked)
        else:
            entries.append(checked)
    if problems:
        raise _refused(directory, problems)
    try:
        manifest = Manifest(center=center, batch=batch, slides=entries)
    except ValueError as exc:
        raise ManifestError(f"{directory}: {exc}") from None
    return manifest, root


def upload_batch(
    directory: str | Path,
    *,
    center: str,
    batch: str,
    store: Store,
    progress: bool = True,
    break_lease: bool = False,
    check_manifest: bool = False,
) -> BatchRef:
    """Validate, copy and commit a batch; never touches a batch that is already committed.

    Two uploads of one batch race for its lease; the commit state is checked again once the
    lease is held, so an upload that validated while another one committed stops there, and
    only objects of an uncommitted batch are ever removed. ``check_manifest`` refuses, before
    anything else, a folder whose ``manifest.json`` names another center (``ccs
    upload`` does); without it the upload's ids replace the manifest's, for a caller that
    uploads one folder under several ids (a synthetic cohort's, say).
    """
    if check_manifest:
        _check_manifest_ids(directory, center, batch)
    if is_committed(store, center, batch):
        raise _already_committed(store, center, batch)
    manifest, root = prepare_batch(directory, center, batch, progress=progress)
    prefix = layout.incoming(center, batch)
    too_long = []
    for s in manifest.slides:
        try:
            store.check_key(f"{prefix}/{s.path}")
        except StoreError as exc:
            too_long.append(str(exc))
    if too_long:
        raise _refused(directory, too_long)
    total = sum(s.bytes for s in manifest.slides)
    with UploadLease(store, center, batch, break_lease=break_lease) as lease:
        if is_committed(store, center, batch):  # committed by another upload while we validated
            raise _already_committed(store, center, batch)
        stale = [k for k in store.list(prefix) if not k.endswith(f"/{UPLOAD_LEASE}")]
        if stale:
            lease.check()
            log.info("removing %d objects left by an unfinished upload of %s", len(stale), prefix)
            for key in stale:
                store.delete(key)
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc=f"uploading {center}/{batch}",
            disable=None if progress else True,  # None: only on a terminal
        ) as bar:
            for s in manifest.slides:
                key = f"{prefix}/{s.path}"
                sent = store.put_file(root / s.path, key)
                fault_point("upload.copy", key)
                if sent != s.sha256:
                    raise UploadError(
                        f"{s.path}: changed after it was validated (the bytes sent hash to "
                        f"{sent[:12]}..., validation saw {s.sha256[:12]}...); nothing committed, "
                        "upload again once the file is final"
                    )
                bar.update(s.bytes)
        lease.check()
        ref = commit_batch(store, manifest, verify_checksums=False)  # hashed as sent, above
    log.info("committed %s: %d slides, %d bytes", store.uri(prefix), len(manifest.slides), total)
    return ref


def committed_as_in_folder(
    directory: str | Path,
    *,
    center: str,
    batch: str,
    store: Store,
    progress: bool = True,
    check_manifest: bool = False,
) -> BatchRef | None:
    """The committed batch ``center/batch`` when it holds exactly the folder's slides, None when
    the batch is not committed; an error when it holds other slides.

    For a re-run of an upload that committed and then failed to register with the service
    (``ccs upload --submit``): the folder is validated and hashed again, nothing is written.
    """
    if check_manifest:
        _check_manifest_ids(directory, center, batch)
    if not is_committed(store, center, batch):
        return None
    manifest, _ = prepare_batch(directory, center, batch, progress=progress)
    ref = load_batch(store, center, batch)
    if ref.manifest.slides != manifest.slides:
        raise AlreadyCommittedError(
            f"{store.uri(ref.prefix)} is already committed with other slides than {directory}; "
            "batches are never overwritten, upload under a new batch id"
        )
    return ref


def _refused(directory: str | Path, problems: list[str]) -> UploadError:
    """One error listing every problem: a center fixes the folder once, not file by file."""
    return UploadError(
        f"{len(problems)} problem(s) in {directory}, nothing uploaded:\n" + "\n".join(problems)
    )


def _already_committed(store: Store, center: str, batch: str) -> AlreadyCommittedError:
    return AlreadyCommittedError(
        f"{store.uri(layout.incoming(center, batch))} is already committed; batches are never "
        "overwritten, upload under a new batch id"
    )


def _folder_files(root: Path) -> tuple[list[Path], list[str]]:
    """The visible top-level files of an upload folder, and a problem per broken link.

    A symlink to a readable file, inside the folder or not, is followed: its content is
    uploaded under the link's name (a center may link slides from a scanner's share). A
    dangling link or a loop is a problem: batches are immutable, so a slide silently left out
    could never be added. Sub-folders are not slides and are skipped.
    """
    files, problems = [], []
    for p in sorted(root.iterdir()):
        if p.name.startswith("."):
            continue
        missing = _not_a_file(p)
        if missing is None:
            files.append(p)
        elif p.is_symlink():
            problems.append(f"{printable(p.name)}: {missing}")
    return files, problems


def _not_a_file(path: Path) -> str | None:
    """Why ``path`` is not a readable regular file (following links), or None."""
    try:
        st = path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symlink loop"
        if path.is_symlink():
            return f"is a dangling symlink (to {printable(os.readlink(path))})"
        return "not found"
    return None if stat.S_ISREG(st.st_mode) else "is not a regular file"


def _identity(path: Path) -> tuple[int, int, int]:
    """(size, mtime, inode): if any moves during validation, what was checked is not the file."""
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino
