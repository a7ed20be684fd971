"""``ccs inspect``: what a slide file is and what screening would make of it, before a run.

A center uploading a batch wants to know, per slide, that it opens, its pixel size (and
where that came from), how much of it has cells, how many tiles screening will read, and
whether it is a cytology preparation at all (``specimen``: screening rejects one that is not).
The same functions open and tile the slide as the screening pipeline does, so what inspect
says is what a run will do; and ``ccs upload`` reads a slide's pixels with :func:`read_pixels`,
as inspect does, so a slide whose tiles inspect cannot decode is refused at upload.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field

from smartccs.errors import NoForegroundError, SlideError
from smartccs.slide.cache import SlideCache
from smartccs.slide.reader import MppSource, Slide, open_slide
from smartccs.slide.specimen import Specimen
from smartccs.slide.tiling import (
    TilePlan,
    TilingConfig,
    TooCoarseError,
    measure_specimen,
    plan_tiles,
)
from smartccs.store import Store, StoreConfig

MPP_OVERRIDE = "override"
"""``mpp_source`` of a pixel size the caller gave (``ccs inspect --mpp``), not the file."""


class SlideReport(BaseModel):
    """One slide as the platform sees it."""

    model_config = ConfigDict(frozen=True)

    name: str
    path: str = Field(description="local path or store URI")
    vendor: str
    width: int
    height: int
    levels: list[tuple[int, int, float]] = Field(description="(width, height, downsample)")
    mpp: float
    mpp_source: MppSource | Literal["override"] = Field(
        description="where mpp came from: the file (openslide, tiff-resolution) or override"
    )
    objective_power: float | None
    bytes: int
    foreground_fraction: float | None = Field(description="None when tiling failed")
    tile_count: int | None = Field(description="tiles screening would read; None on failure")
    tiling: TilingConfig
    tiling_error: str | None = Field(
        default=None, description="why screening would fail this slide (no cells, too coarse)"
    )
    specimen: Specimen | None = Field(
        default=None,
        description="cytology or not_cytology (rejected, not screened), with its measurements; "
        "None when the slide is too coarse to plan",
    )


def inspect_slide(
    target: str,
    *,
    store: Store | None = None,
    mpp_override: float | None = None,
    tiling: TilingConfig | None = None,
    cache: SlideCache | None = None,
) -> SlideReport:
    """Open, describe and plan the tiles of a local slide or an ``s3://`` object.

    Raises a ``SlideError`` (one line) when the file cannot be opened, has no pixel size or
    has a tile :func:`read_pixels` cannot decode; a slide that opens but would not tile (no
    cells, scanned too coarse) is reported, with the reason in ``tiling_error``.
    ``mpp_override`` replaces the file's pixel size and is reported as ``mpp_source``
    ``override``.
    """
    tiling = tiling or TilingConfig()
    remote = "://" in target and not target.startswith("file://")
    name = PurePosixPath(urlparse(target).path).name if remote else Path(target).name
    path = _local_copy(target, store, cache) if remote else Path(target.removeprefix("file://"))
    with open_slide(path, mpp_override=mpp_override, name=name) as slide:
        info = slide.info
        pixels = read_pixels(slide, tiling)
    plan = pixels.plan
    return SlideReport(
        name=name,
        path=target if remote else str(path.resolve()),
        vendor=info.vendor,
        width=info.width,
        height=info.height,
        levels=[
            (w, h, d)
            for (w, h), d in zip(info.level_dimensions, info.level_downsamples, strict=True)
        ],
        mpp=info.mpp,
        mpp_source=MPP_OVERRIDE if mpp_override is not None else info.mpp_source,
        objective_power=info.objective_power,
        bytes=info.bytes,
        foreground_fraction=plan.foreground_fraction if plan else None,
        tile_count=len(plan.tiles) if plan else None,
        tiling=tiling,
        tiling_error=pixels.tiling_error,
        specimen=pixels.specimen,
    )


@dataclass(frozen=True)
class Pixels:
    """What a slide's pixels say: its tile plan, or why it has none, and what the glass holds."""

    plan: TilePlan | None
    tiling_error: str | None
    """why screening would fail the slide (no cells, scanned too coarse); None with a plan"""
    specimen: Specimen | None
    """cytology or not; None when the slide is too coarse to plan"""


def read_pixels(slide: Slide, tiling: TilingConfig) -> Pixels:
    """Plan ``slide``'s tiles as screening will, and decode one stored tile of every level.

    What ``ccs inspect`` and ``ccs upload`` make of a slide's pixels, so the two doors agree: a
    tile that cannot be decoded raises the reader's ``SlideError``, one line naming the file,
    the level, the region and OpenSlide's reason (``Corrupt JPEG data: ...``). A slide that
    reads but would not tile (no cells, scanned too coarse) is no error: ``tiling_error`` says
    why screening will fail it.

    The cost is bounded, because a center's upload must not cost a screening run: planning
    reads the low-resolution mask level whole (so every tile of it is checked), then one tile
    per level is decoded: a handful of tiles, where decoding every tile of level 0 (some
    100,000 on a whole slide) would take as long as screening it. The tile is taken under the
    cells (the middle planned tile), else in the middle of the slide: formats that leave out
    empty tiles still store those, and a tile that is there decodes or not whatever it shows.
    A corrupt tile elsewhere is left to screening, which fails only that tile's reads.
    """
    plan = None
    error = None
    specimen = None
    try:
        plan = plan_tiles(slide, tiling)
        specimen = plan.specimen
    except (NoForegroundError, TooCoarseError) as exc:
        error = str(exc).removeprefix(f"{slide.name}: ")
        if isinstance(exc, NoForegroundError):  # blank glass: measured all the same
            specimen = measure_specimen(slide, tiling)
    if plan and plan.tiles:
        t = plan.tiles[len(plan.tiles) // 2]
        x, y = t.x0 + t.w0 / 2, t.y0 + t.h0 / 2
    else:
        x, y = slide.info.width / 2, slide.info.height / 2
    _read_one_tile_per_level(slide, x, y)
    return Pixels(plan=plan, tiling_error=error, specimen=specimen)


def _read_one_tile_per_level(slide: Slide, x: float, y: float) -> None:
    """Decode, on every level, the stored tile holding level-0 point ``(x, y)``: the read is
    aligned on that level's tile grid, so it decodes that one tile."""
    info = slide.info
    for level, ((lw, lh), d) in enumerate(
        zip(info.level_dimensions, info.level_downsamples, strict=True)
    ):
        tw, th = slide.tile_size(level)
        lx = min(int(x / d), lw - 1) // tw * tw
        ly = min(int(y / d), lh - 1) // th * th
        slide.read_rgba(level, round(lx * d), round(ly * d), min(tw, lw - lx), min(th, lh - ly))


def _local_copy(uri: str, store: Store | None, cache: SlideCache | None) -> Path:
    """A cached local copy of an object in an S3 store (OpenSlide reads local files only)."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("s3", "s3a"):
        raise SlideError(f"{uri}: unsupported location (a local path or s3://bucket/key)")
    if store is None or store.protocol != "s3":
        store = Store(StoreConfig.from_env(f"s3://{parsed.netloc}"))
    key = store.key_of(uri)
    return (cache or SlideCache.from_env()).local_path(store, key, sha256=None, size=None)


def format_report(report: SlideReport) -> str:
    """The report as aligned ``label  value`` lines for a terminal."""
    r = report
    mm = f"{r.width * r.mpp / 1000:.2f} x {r.height * r.mpp / 1000:.2f} mm"
    levels = [
        f"{i}: {w} x {h} px  x{d:g}  {r.mpp * d:.3g} µm/px" for i, (w, h, d) in enumerate(r.levels)
    ]
    t = r.tiling
    if r.tiling_error:
        tiles = f"none: {r.tiling_error}"
    else:
        tiles = (
            f"{r.tile_count} of {t.tile_px} px at {t.target_mpp:g} µm/px "
            f"({t.tile_um:g} µm), min foreground {t.min_foreground:.0%}"
        )
    rows = [
        ("slide", r.name),
        ("path", r.path),
        ("vendor", r.vendor),
        ("dimensions", f"{r.width} x {r.height} px ({mm})"),
        ("levels", levels[0]),
        *(("", line) for line in levels[1:]),
        ("mpp", f"{r.mpp:.4g} µm/px ({_mpp_source(r.mpp_source)})"),
        ("objective", f"{r.objective_power:g}x" if r.objective_power else "not declared"),
        ("size", _human_bytes(r.bytes)),
        (
            "foreground",
            "n/a" if r.foreground_fraction is None else f"{r.foreground_fraction:.1%} of the slide",
        ),
        ("tiles", tiles),
        ("specimen", _specimen_line(r.specimen)),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def _mpp_source(source: str) -> str:
    return "given on the command line, --mpp" if source == MPP_OVERRIDE else f"from {source}"


def _specimen_line(s: Specimen | None) -> str:
    if s is None:
        return "n/a"
    if s.kind != "cytology":
        return f"NOT CYTOLOGY, screening rejects it: {s.reason}"
    return (
        f"cytology: {s.stained_mm2:.3g} mm² stained on {s.glass_mm2:.3g} mm² of glass, "
        f"{s.solid_fraction:.0%} of it solid over {s.solid_um:.0f} µm"
    )


def _human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"
