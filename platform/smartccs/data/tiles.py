"""The tile stream on Ray Data: slide rows -> planned tiles -> tile pixels.

Planning (open the slide, find foreground on a thumbnail, lay the physical grid) runs as tasks,
one slide each; reading runs on a pool of actors, each keeping a few slides open and a local
slide cache, fed batches of neighbouring tiles so a handle is opened once and reused. Only tile
coordinates and tile pixels ever enter the object store, never a whole slide, and Ray Data's
streaming executor bounds how many are in flight. A slide that cannot be planned becomes one
error row, a slide that is not a cytology preparation (``slide.specimen``) one ``rejected``
row, and a tile that cannot be read an error tile row: all travel downstream to the results
instead of failing the batch.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from smartccs.batches import BatchRef
from smartccs.errors import CCSError, NoForegroundError
from smartccs.faults import fault_point
from smartccs.results.schema import STATUS_REJECTED
from smartccs.slide.cache import SlideCache, default_max_bytes, default_root
from smartccs.slide.qc import tile_qc
from smartccs.slide.reader import Slide, copy_rgb, open_slide
from smartccs.slide.tiling import TileSpec, TilingConfig, plan_tiles, read_tile
from smartccs.store import Store, StoreConfig

log = logging.getLogger(__name__)

STATUS_OK = "ok"
STATUS_ERROR = "error"
NO_TILE = -1
"""``tile_index`` of the single row that stands for a slide that could not be planned."""


class StreamConfig(BaseModel):
    """How tiles are planned and read; shared by the batch job and the service."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tiling: TilingConfig = TilingConfig()
    readers: int = Field(default=2, ge=1, description="maximum number of reader actors")
    reader_cpus: float = Field(default=1.0, gt=0, description="CPUs reserved per reader actor")
    planner_cpus: float = Field(default=0.5, gt=0, description="CPUs reserved per planning task")
    planners: int | None = Field(
        default=None,
        ge=1,
        description="planning tasks at once; null: as many as readers. A plan (a slide's tissue "
        "grid from its thumbnail) takes well under a second once the slide is local, so this "
        "many keep the readers fed; an uncapped stage starts a worker process per slide",
    )
    batch_size: int = Field(default=16, ge=1, description="tiles per reader call")
    open_slides: int = Field(default=2, ge=1, description="slide handles kept open per actor")
    cache_dir: str | None = Field(
        default=None,
        description="local slide cache; null: each node's own $CCS_SLIDE_CACHE (default "
        "~/.cache/smartccs/slides), read on the node, not on the driver",
    )
    cache_max_bytes: int | None = Field(
        default=None, gt=0, description="slide cache bound; null: the node's $CCS_SLIDE_CACHE_GB"
    )


def slide_rows(batches: Iterable[BatchRef]) -> list[dict[str, Any]]:
    """One row per slide of the given committed batches: the input of :func:`tile_stream`."""
    return [
        {
            "center": b.center,
            "batch": b.batch,
            "slide_id": s.slide_id,
            "key": b.slide_key(s.path),
            "sha256": s.sha256,
            "bytes": s.bytes,
            "mpp_override": float(s.mpp) if s.mpp else float("nan"),
        }
        for b in batches
        for s in b.manifest.slides
    ]


class _SlideHandles:
    """The slides one process has open, least recently used closed first."""

    def __init__(self, store_config: StoreConfig, cfg: StreamConfig):
        self.store = Store(store_config)
        self.cache = SlideCache(  # resolved here, on the node that holds the cache
            Path(cfg.cache_dir or default_root()), cfg.cache_max_bytes or default_max_bytes()
        )
        self.capacity = cfg.open_slides
        self._open: OrderedDict[str, Slide] = OrderedDict()

    def get(self, row: dict[str, Any]) -> Slide:
        """The slide open, through the cache. A handle whose cache file was evicted since is
        reopened (downloaded again): OpenSlide 4 rereads TIFF-based slides by path, so the
        old handle's next read would fail."""
        key = row["key"]
        slide = self._open.get(key)
        if slide is not None and not slide.path.exists():
            self._open.pop(key).close()
            slide = None
        if slide is not None:
            self._open.move_to_end(key)
            return slide
        local = self.cache.local_path(self.store, key, row["sha256"], int(row["bytes"]))
        mpp = row["mpp_override"]
        slide = open_slide(local, mpp_override=None if np.isnan(mpp) else float(mpp), name=key)
        self._open[key] = slide
        while len(self._open) > self.capacity:
            self._open.popitem(last=False)[1].close()
        return slide


def _slide_columns(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("center", "batch", "slide_id", "key", "sha256", "bytes")} | {
        "mpp_override": row["mpp_override"]
    }


TILE_COLUMNS = {"tile_index": "index", **{f: f for f in TileSpec.model_fields if f != "index"}}
"""A planned tile's columns in the stream (``tile_index`` is ``TileSpec.index``): written by
:func:`_tile_row`, read back into a ``TileSpec`` by :func:`tile_spec`."""


def _spec_columns(spec: TileSpec | None) -> dict[str, Any]:
    if spec is None:
        return {c: float("nan") if f == "fg_fraction" else NO_TILE for c, f in TILE_COLUMNS.items()}
    return {c: getattr(spec, f) for c, f in TILE_COLUMNS.items()}


def tile_spec(row: dict[str, Any]) -> TileSpec:
    """The ``TileSpec`` a stream row was planned from (numpy scalars made Python's)."""
    return TileSpec(**{f: np.asarray(row[c]).item() for c, f in TILE_COLUMNS.items()})


def _tile_row(row: dict[str, Any], spec: TileSpec | None, n_tiles: int, **extra) -> dict:
    return (
        _slide_columns(row)
        | _spec_columns(spec)
        | {
            "n_tiles": n_tiles,
            "slide_mpp": float("nan"),
            "slide_area_mm2": float("nan"),
            "sat_threshold": float("nan"),
            "od_threshold": float("nan"),
            "status": STATUS_OK,
            "error": "",
        }
        | extra
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, CCSError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def plan_slide(
    row: dict[str, Any],
    *,
    store_config: StoreConfig,
    cfg: StreamConfig,
    select: Callable[[dict[str, Any]], bool] | None = None,
) -> list[dict]:
    """Tile rows of one slide (those ``select`` keeps, if given), or one row when the slide
    cannot be planned: an error row, or a ``rejected`` row when the glass is not a cytology
    preparation (blank, a tissue section, almost no cells), whose ``error`` says what was
    measured. Neither has a tile to read, and both always pass ``select``."""
    fault_point("tiles.plan", row["key"])
    slide_name = f"{row['center']}/{row['batch']}/{row['slide_id']}"
    try:
        slide = _SlideHandles(store_config, cfg).get(row)
        try:
            plan = plan_tiles(slide, cfg.tiling)
        finally:
            slide.close()
    except NoForegroundError as exc:  # blank glass: nothing stained to screen
        log.warning("slide %s rejected: %s", slide_name, exc)
        prefix = f"{row['key']}: "
        reason = f"blank glass: {str(exc).removeprefix(prefix)}"
        return [_tile_row(row, None, 0, status=STATUS_REJECTED, error=reason)]
    except Exception as exc:  # every failure of one slide becomes its error row
        log.warning("slide %s: %s", slide_name, exc)
        return [_tile_row(row, None, 0, status=STATUS_ERROR, error=_describe(exc))]
    if plan.specimen is not None and plan.specimen.kind != "cytology":
        log.warning("slide %s rejected: %s", slide_name, plan.specimen.reason)
        return [_tile_row(row, None, 0, status=STATUS_REJECTED, error=plan.specimen.reason)]
    n = len(plan.tiles)
    slide = {
        "slide_mpp": float(plan.info.mpp),
        # the scanned glass, which adequacy's minimum is pro-rated to (screening.adequacy)
        "slide_area_mm2": plan.info.width * plan.info.height * plan.info.mpp**2 / 1e6,
        "sat_threshold": float(plan.saturation_threshold),
        "od_threshold": float(plan.od_threshold),
    }
    rows = [_tile_row(row, t, n, **slide) for t in plan.tiles]
    return rows if select is None else [r for r in rows if select(r)]


class TileReader:
    """Ray Data actor: reads the pixels and QC of a batch of planned tiles.

    With ``readable_only`` it returns just the tiles read without error, and only ``columns``
    of them: a training stream's filter done where the pixels are, not in a stage of its own
    (another operator is more worker processes and a copy of every batch)."""

    def __init__(
        self,
        store_config: StoreConfig,
        cfg: StreamConfig,
        readable_only: bool = False,
        columns: Sequence[str] | None = None,
    ):
        self.cfg, self.readable_only, self.columns = cfg, readable_only, columns
        self.handles = _SlideHandles(store_config, cfg)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["slide_id"])
        px = self.cfg.tiling.tile_px
        images = np.empty((n, px, px, 3), dtype=np.uint8)
        status = batch["status"].astype(object).copy()
        error = batch["error"].astype(object).copy()
        bg = np.full(n, np.nan, dtype=np.float32)
        blur = np.full(n, np.nan, dtype=np.float32)
        od = np.full(n, np.nan, dtype=np.float32)
        for i in range(n):
            if status[i] != STATUS_OK:
                images[i] = 0
                continue
            row = {k: batch[k][i] for k in batch}
            try:
                slide = self.handles.get(row)
                spec = tile_spec(row)
                copy_rgb(images[i], read_tile(slide, spec, self.cfg.tiling))
                fault_point("tiles.read", row["key"])
                q = tile_qc(
                    images[i],
                    saturation_threshold=float(row["sat_threshold"]),
                    od_threshold=float(row["od_threshold"]),
                )
                bg[i], blur[i], od[i] = q.background_fraction, q.blur, q.mean_od
            except Exception as exc:  # one unreadable tile must not sink its slide's batch
                status[i], error[i] = STATUS_ERROR, _describe(exc)
                images[i] = 0
        out = dict(batch) | {
            "status": status.astype(str),
            "error": error.astype(str),
            "image": images,
            "background_fraction": bg,
            "blur": blur,
            "mean_od": od,
        }
        if not self.readable_only:
            return out
        keep = out["status"] == STATUS_OK
        return {c: out[c][keep] for c in self.columns or out}


def tile_draw(row: dict[str, Any], seed: int) -> float:
    """A planned tile's fixed draw in [0, 1): the same tile, seed and value on every worker,
    epoch and resume, so a sampled subset is decided on coordinates, before pixels are read."""
    slide = f"{row['center']}/{row['batch']}/{row['slide_id']}"
    key = f"{seed}:{slide}:{int(row['x0'])}:{int(row['y0'])}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


class TileShare:
    """Keeps a fixed share of every slide's planned tiles (``tile_draw`` below ``share``)."""

    def __init__(self, share: float, seed: int):
        self.share, self.seed = share, seed

    def __call__(self, row: dict[str, Any]) -> bool:
        return tile_draw(row, self.seed) < self.share


def shuffled_slides(rows: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Slide rows in a seeded random order: the stream reads slides roughly in row order, and a
    run shorter than an epoch would otherwise learn from the first center's slides only."""
    out = sorted(rows, key=lambda r: (r["center"], r["batch"], r["slide_id"]))
    random.Random(seed).shuffle(out)
    return out


def plan_stream(
    rows: list[dict[str, Any]],
    store_config: StoreConfig,
    cfg: StreamConfig | None = None,
    select: Callable[[dict[str, Any]], bool] | None = None,
    block_rows: int | None = None,
):
    """A Ray Dataset of planned tile rows (coordinates, QC thresholds, status), no pixels.

    The screening engine reads these itself, inside the actor that runs the detector, so tile
    pixels never enter the object store; :func:`tile_stream` adds the pixels for consumers
    that want them as a stream. A slide's plan leaves its task cut into blocks of
    ``block_rows`` tiles (default: ``cfg.batch_size``), the most one call downstream takes:
    as one block, a slide would go whole to a single actor, and one large slide would keep
    one scorer busy while the others idle.
    """
    import ray

    cfg = cfg or StreamConfig()
    tasks = {
        "compute": ray.data.TaskPoolStrategy(size=cfg.planners or cfg.readers),
        "num_cpus": cfg.planner_cpus,
    }
    planned = ray.data.from_items(rows, override_num_blocks=max(1, len(rows))).map_batches(
        _plan_batch,
        fn_kwargs={"store_config": store_config, "cfg": cfg, "select": select},
        batch_size=1,  # a slide per call
        batch_format="pyarrow",
        **tasks,
    )
    return _cut_blocks(planned, block_rows or cfg.batch_size, **tasks)


def _cut_blocks(ds: Any, rows: int, compute: Any, num_cpus: float) -> Any:
    """``ds`` with its map tasks' output cut into blocks of at most ``rows`` rows, inside those
    tasks (Ray Data fuses a non-strict streaming repartition into the ``map_batches`` before
    it when both ask for the same resources and task cap). ``Dataset.repartition`` takes no
    resources: its default of one CPU would neither fuse nor fit beside a scorer pool that
    leaves planning its fraction, so the operator is built here (Ray 2.60's own constructor;
    ``tests/test_tile_stream.py`` pins that it fuses)."""
    from ray.data import Dataset
    from ray.data._internal.logical.interfaces import LogicalPlan
    from ray.data._internal.logical.operators import StreamingRepartition

    op = StreamingRepartition(
        target_num_rows_per_block=rows,
        input_dependencies=[ds._logical_plan.dag],
        compute=compute,
        ray_remote_args={"num_cpus": num_cpus},
    )
    return Dataset._from_parent(ds, LogicalPlan(op, ds.context))


def _plan_batch(batch: Any, **kwargs: Any) -> Any:
    """``plan_slide`` over a batch of slide rows (an Arrow table), as one Arrow table."""
    import pyarrow as pa

    return pa.Table.from_pylist([t for row in batch.to_pylist() for t in plan_slide(row, **kwargs)])


def tile_stream(
    rows: list[dict[str, Any]],
    store_config: StoreConfig,
    cfg: StreamConfig | None = None,
    select: Callable[[dict[str, Any]], bool] | None = None,
    readable_only: bool = False,
    columns: Sequence[str] | None = None,
):
    """A Ray Dataset of tile rows (coordinates, status, ``image`` uint8 HxWx3, QC) for ``rows``.

    ``rows`` come from :func:`slide_rows`. The dataset is lazy and streams: iterate it, or chain
    the detector onto it, and memory stays bounded by Ray Data's backpressure. ``select``
    keeps only some planned tiles (a training job's sampling) before any pixel is read; a
    slide's error row always passes. ``readable_only`` (training) keeps only the tiles read
    without error, and of them only ``columns`` (all when None).
    """
    import ray

    cfg = cfg or StreamConfig()
    reader = {"store_config": store_config, "cfg": cfg, "readable_only": readable_only,
              "columns": tuple(columns) if columns is not None else None}  # fmt: skip
    return plan_stream(rows, store_config, cfg, select).map_batches(
        TileReader,
        fn_constructor_kwargs=reader,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.readers),
        batch_size=cfg.batch_size,
        batch_format="numpy",
        num_cpus=cfg.reader_cpus,
    )


def sample_tiles(
    store_config: StoreConfig, rows: list[dict[str, Any]], stream: StreamConfig, n: int
) -> np.ndarray:
    """Up to ``n`` tiles spread evenly over a batch's slides, read at the stream's tiling."""
    planned = [
        t
        for r in rows
        for t in plan_slide(r, store_config=store_config, cfg=stream)
        if t["status"] == STATUS_OK
    ]
    if not planned:
        return np.zeros((0, stream.tiling.tile_px, stream.tiling.tile_px, 3), np.uint8)
    pick = np.unique(np.linspace(0, len(planned) - 1, min(n, len(planned))).round().astype(int))
    chosen = [planned[i] for i in pick]
    batch = {k: np.asarray([t[k] for t in chosen]) for k in chosen[0]}
    read = TileReader(store_config, stream)(batch)
    return read["image"][read["status"] == STATUS_OK]
