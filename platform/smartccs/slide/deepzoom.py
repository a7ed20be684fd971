"""Deep Zoom tiles of committed slides, for the review workstation's slide viewer.

A browser viewer (OpenSeadragon) asks for a slide's Deep Zoom description and then for many
small JPEG tiles, a few at a time from a threadpool. Tiles are cut by OpenSlide's own
``DeepZoomGenerator``; this module decides which file a request may reach and keeps a few
slides open so a warm tile costs one ``read_region`` and one JPEG encode.

A slide is found only through its center's committed batch manifest, by validated ids, and
reached through the slide cache (``SlideCache.local_path``, verified against the manifest's
sha256 and size): a request can name nothing else. Every failure a request can provoke is a
``CCSError`` whose message names the ids asked for and never a store URI or a local path; the
reason for an unreadable slide goes to the log instead.

Thread safety: OpenSlide (>= 3.3.1; 4.0.1 here) documents every function but
``openslide_close`` as safe to call concurrently on one handle, and ctypes releases the GIL
around its calls, so tiles of one slide are read in parallel without a lock. What must not
race a read is ``close``: each open slide counts its readers, and a slide evicted from the LRU
is closed when its last reader lets go of it.

The slide cache may delete a file that a slide here has open. OpenSlide 4 keeps no file
descriptor between calls (its TIFF reader reopens the file by path for each read), so the open
handle does not keep the deleted file readable: its next read that misses OpenSlide's tile
cache fails. That read is answered by opening the slide again through the cache, which
downloads it again; the cache's byte bound holds, since nothing keeps deleted files alive.
"""

from __future__ import annotations

import contextlib
import io
import logging
import operator
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import openslide
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from smartccs.batches import is_committed, load_batch
from smartccs.errors import CCSError, InvalidIdError, SlideError
from smartccs.ids import SlideKey, validate_id
from smartccs.slide.cache import SlideCache
from smartccs.slide.reader import MppSource, open_slide
from smartccs.store import Store

log = logging.getLogger(__name__)

TILE_FORMAT = "jpeg"
JPEG_QUALITY = 80
CROP_PX = 160
"""Side of a gallery crop, px."""
DEFAULT_MAX_OPEN = 8
DEFAULT_TILE_CACHE_BYTES = 64 * 2**20
"""One OpenSlide tile cache shared by the open slides, so memory stays bounded however many
are open (OpenSlide's default is 32 MiB per handle)."""

MAX_TILE_READ_PIXELS = 2**24
"""A Deep Zoom tile is refused when OpenSlide would decode more pixels than this to make it
(64 MiB of RGBA): the coarsest zooms of a slide whose pyramid stops at a large level would
otherwise decode that whole level for one 256 px tile, per request."""

MARK_USED_EVERY_S = 10.0
"""How often reads of an open slide mark its cache file used (``SlideCache.mark_used``): often
enough for an eviction to see a slide being viewed as recent, not a file time per tile."""


class SlideNotFound(CCSError):
    """No such slide in a committed batch of that center (or ids that cannot name one)."""


class TileNotFound(CCSError):
    """No such Deep Zoom tile in the slide's pyramid."""


class SlideUnreadable(SlideError):
    """A committed slide that cannot be opened or read now; the log says why."""


class SlideView(BaseModel):
    """What a viewer needs to show a slide: its Deep Zoom pyramid, where level-0 boxes of the
    whole slide land on it, and the pixel size for a scale bar."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    center: str
    batch: str
    slide_id: str
    dzi: str = Field(description="the .dzi XML document")
    format: Literal["jpeg"] = TILE_FORMAT
    tile_size: int = Field(description="Deep Zoom tile side, px, without overlap")
    overlap: int = Field(description="px each tile repeats of its neighbours")
    width: int = Field(description="Deep Zoom image width, px (the slide's bounds at level 0)")
    height: int = Field(description="Deep Zoom image height, px")
    levels: int = Field(description="Deep Zoom levels; levels - 1 is full resolution")
    min_level: int = Field(description="coarsest level from which on every tile is served "
                           "(coarser ones may decode over MAX_TILE_READ_PIXELS)")  # fmt: skip
    slide_width: int = Field(description="level-0 width of the whole slide, px")
    slide_height: int = Field(description="level-0 height of the whole slide, px")
    bounds_x: int = Field(description="level-0 x of the image's left edge: a box at level-0 "
                          "(x, y) is at image (x - bounds_x, y - bounds_y)")  # fmt: skip
    bounds_y: int = Field(description="level-0 y of the image's top edge")
    mpp: float = Field(description="level-0 µm per pixel, as screening resolves it")
    mpp_source: MppSource


@dataclass
class _Open:
    """One open slide and the requests reading it now."""

    osr: openslide.OpenSlide
    generator: DeepZoomGenerator
    view: SlideView
    path: Path
    users: int = 0
    retired: bool = False
    used_at: float = field(default_factory=time.monotonic)  # last marked used in the cache


class DeepZoomSlides:
    """Deep Zoom descriptions and JPEG tiles of a store's committed slides.

    At most ``max_open`` slides stay open between requests (least recently used closed first);
    safe to call from many threads.
    """

    def __init__(
        self,
        store: Store,
        cache: SlideCache,
        *,
        max_open: int = DEFAULT_MAX_OPEN,
        tile_size: int = 254,
        overlap: int = 1,
        limit_bounds: bool = True,
        quality: int = JPEG_QUALITY,
        tile_cache_bytes: int = DEFAULT_TILE_CACHE_BYTES,
    ) -> None:
        if max_open < 1:
            raise ValueError(f"max_open must be at least 1, got {max_open}")
        self.store = store
        self.cache = cache
        self.max_open = max_open
        self.tile_size = tile_size
        self.overlap = overlap
        self.limit_bounds = limit_bounds
        self.quality = quality
        self._tile_cache = openslide.OpenSlideCache(tile_cache_bytes)
        self._lock = threading.Lock()
        self._open: OrderedDict[SlideKey, _Open] = OrderedDict()
        self._opening: dict[SlideKey, threading.Lock] = {}

    def __enter__(self) -> DeepZoomSlides:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self, center: str, batch: str, slide_id: str) -> SlideView:
        """The slide's Deep Zoom geometry, bounds offset and pixel size."""
        with self._using(center, batch, slide_id) as slide:
            return slide.view

    def dzi(self, center: str, batch: str, slide_id: str) -> str:
        """The slide's ``.dzi`` XML document."""
        return self.describe(center, batch, slide_id).dzi

    def tile(self, center: str, batch: str, slide_id: str, level: int, col: int, row: int) -> bytes:
        """One Deep Zoom tile as JPEG bytes; ``TileNotFound`` outside the pyramid."""
        image = self._tile_image(center, batch, slide_id, level, col, row, retry=True)
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=self.quality)
        return buf.getvalue()

    def region(
        self,
        center: str,
        batch: str,
        slide_id: str,
        box: tuple[float, float, float, float],
        out_px: int = CROP_PX,
    ) -> bytes:
        """A JPEG of level-0 ``box`` (x0, y0, x1, y1) with as much around it again (a cell
        in its neighbourhood, for the gallery), at most ``out_px`` on a side."""
        x0, y0, x1, y1 = box
        side = max(x1 - x0, y1 - y0, 1.0) * 2
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        with self._using(center, batch, slide_id) as slide:
            osr = slide.osr
            level = osr.get_best_level_for_downsample(max(1.0, side / out_px))
            down = osr.level_downsamples[level]
            n = max(1, min(int(side / down), 4 * out_px))
            try:
                image = osr.read_region(
                    (int(cx - side / 2), int(cy - side / 2)), level, (n, n)
                ).convert("RGB")
            except openslide.OpenSlideError as exc:
                self._retire(slide)
                raise self._unreadable(slide.view, exc) from None
        image.thumbnail((out_px, out_px))
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=self.quality)
        return buf.getvalue()

    def _tile_image(
        self, center: str, batch: str, slide_id: str, level: int, col: int, row: int, retry: bool
    ) -> Image.Image:
        with self._using(center, batch, slide_id) as slide:
            where = f"no tile {level}/{col}_{row} in slide {slide.view.slide_id!r}"
            try:
                address = (operator.index(col), operator.index(row))
                level = operator.index(level)
                _, _, (w, h) = slide.generator.get_tile_coordinates(level, address)
            except (TypeError, ValueError):  # DeepZoomGenerator's out-of-range is ValueError
                raise TileNotFound(where) from None
            if w * h > MAX_TILE_READ_PIXELS:
                raise TileNotFound(f"{where}: coarser than its pyramid can render")
            try:
                return slide.generator.get_tile(level, address)
            except openslide.OpenSlideError as exc:
                self._retire(slide)  # OpenSlide's errors are sticky: the next request reopens
                if not (retry and not slide.path.exists()):
                    raise self._unreadable(slide.view, exc) from None
        # the slide cache deleted the file under the open handle: open it again through it
        return self._tile_image(center, batch, slide_id, level, col, row, retry=False)

    def open_slides(self) -> list[SlideKey]:
        """The slides kept open, least recently used first."""
        with self._lock:
            return list(self._open)

    def close(self) -> None:
        """Close every slide (those being read close when their reads end)."""
        with self._lock:
            slides = list(self._open.values())
            self._open.clear()
        for slide in slides:
            self._retire(slide)

    # --- the LRU of open slides -------------------------------------------------------------
    @contextlib.contextmanager
    def _using(self, center: str, batch: str, slide_id: str) -> Iterator[_Open]:
        """The open slide, counted as in use (so never closed under a read) until released."""
        slide = self._acquire(_key(center, batch, slide_id))
        try:
            yield slide
        finally:
            with self._lock:
                slide.users -= 1
                close = slide.retired and slide.users == 0
            if close:
                slide.osr.close()

    def _acquire(self, key: SlideKey) -> _Open:
        with self._lock:
            hit = self._hit(key)
            if hit is not None:
                return hit
            opening = self._opening.setdefault(key, threading.Lock())
        with opening:  # one open per slide: concurrent first requests wait for it
            with self._lock:
                hit = self._hit(key)
                if hit is not None:
                    return hit
            try:
                slide = self._load(key)
            except BaseException:
                with self._lock:
                    self._opening.pop(key, None)
                raise
            with self._lock:
                self._opening.pop(key, None)
                slide.users = 1
                prior = self._open.pop(key, None)  # a duplicate open after a failed one
                evicted = [prior] if prior is not None else []
                self._open[key] = slide
                while len(self._open) > self.max_open:
                    evicted.append(self._open.popitem(last=False)[1])
        for old in evicted:
            self._retire(old)
        return slide

    def _hit(self, key: SlideKey) -> _Open | None:
        """Called under the lock."""
        slide = self._open.get(key)
        if slide is not None:
            self._open.move_to_end(key)
            slide.users += 1
            now = time.monotonic()
            if now - slide.used_at >= MARK_USED_EVERY_S:
                slide.used_at = now
                self.cache.mark_used(slide.path)
        return slide

    def _retire(self, slide: _Open) -> None:
        """Take the slide out of the LRU; close it now if nobody reads it, else on release."""
        with self._lock:
            key = (slide.view.center, slide.view.batch, slide.view.slide_id)
            if self._open.get(key) is slide:
                del self._open[key]
            close = not slide.retired and slide.users == 0
            slide.retired = True
        if close:
            slide.osr.close()

    # --- opening ----------------------------------------------------------------------------
    def _load(self, key: SlideKey) -> _Open:
        """Find the slide in its committed manifest and open it through the slide cache."""
        center, batch, slide_id = key
        missing = SlideNotFound(f"no slide {slide_id!r} in batch {batch!r} of center {center!r}")
        if not is_committed(self.store, center, batch):
            raise missing
        try:
            ref = load_batch(self.store, center, batch)
        except CCSError as exc:
            log.warning("batch %s/%s cannot be loaded for viewing: %s", center, batch, exc)
            raise SlideUnreadable(
                f"batch {batch!r} of center {center!r} cannot be read now"
            ) from None
        try:
            entry = ref.manifest.slide(slide_id)
        except KeyError:
            raise missing from None
        name = f"{center}/{batch}/{slide_id}"
        try:
            local = self.cache.local_path(
                self.store, ref.slide_key(entry.path), entry.sha256, entry.bytes
            )
            with open_slide(local, mpp_override=entry.mpp, name=name) as checked:
                info = checked.info  # refuses bombs and slides without a pixel size
            osr = openslide.OpenSlide(local)
        except (CCSError, openslide.OpenSlideError, OSError) as exc:
            raise self._unreadable(key, exc) from None
        try:
            osr.set_cache(self._tile_cache)
            generator = DeepZoomGenerator(
                osr, tile_size=self.tile_size, overlap=self.overlap, limit_bounds=self.limit_bounds
            )
            bounds = generator.get_tile_coordinates(generator.level_count - 1, (0, 0))[0]
            width, height = generator.level_dimensions[-1]
            view = SlideView(
                center=center,
                batch=batch,
                slide_id=slide_id,
                dzi=generator.get_dzi(TILE_FORMAT),
                tile_size=self.tile_size,
                overlap=self.overlap,
                width=width,
                height=height,
                levels=generator.level_count,
                min_level=_min_level(generator),
                slide_width=info.width,
                slide_height=info.height,
                bounds_x=bounds[0],
                bounds_y=bounds[1],
                mpp=info.mpp,
                mpp_source=info.mpp_source,
            )
        except BaseException:
            osr.close()
            raise
        return _Open(osr=osr, generator=generator, view=view, path=local)

    @staticmethod
    def _unreadable(where: SlideKey | SlideView, exc: Exception) -> SlideUnreadable:
        """The error for the web layer (ids only); the reason, which may name paths, is logged."""
        if isinstance(where, SlideView):
            where = (where.center, where.batch, where.slide_id)
        center, batch, slide_id = where
        log.warning("slide %s/%s/%s cannot be read for viewing: %s", *where, exc)
        return SlideUnreadable(
            f"slide {slide_id!r} in batch {batch!r} of center {center!r} cannot be read now"
        )


def _key(center: str, batch: str, slide_id: str) -> SlideKey:
    """Validated ids, before anything is looked up; an invalid one names no slide."""
    try:
        return (
            validate_id(center, "center"),
            validate_id(batch, "batch"),
            validate_id(slide_id, "slide id"),
        )
    except InvalidIdError:
        raise SlideNotFound(
            f"no slide {_shown(slide_id)} in batch {_shown(batch)} of center {_shown(center)}"
        ) from None


def _shown(value: object) -> str:
    """An id from a request, quoted, on one line and short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _min_level(generator: DeepZoomGenerator) -> int:
    """The coarsest level from which on no tile decodes over ``MAX_TILE_READ_PIXELS``, for
    the viewer's ``minLevel``: it then never asks for a tile that ``tile`` refuses.

    Tile (0, 0) and tile (1, 1), an interior one with overlap on every side where the level
    has one, are the largest reads of a level.
    """
    level = generator.level_count
    while level > 0:
        cols, rows = generator.level_tiles[level - 1]
        for address in {(0, 0), (min(1, cols - 1), min(1, rows - 1))}:
            w, h = generator.get_tile_coordinates(level - 1, address)[2]
            if w * h > MAX_TILE_READ_PIXELS:
                return level
        level -= 1
    return 0
