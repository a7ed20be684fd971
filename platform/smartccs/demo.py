"""The main job on embedded defaults: what a newcomer runs first.

Today it runs the data plane end to end on a synthetic multi-center cohort: generate it,
upload each center as a committed batch, stream every tile through Ray Data, and summarise
tiles and QC per slide. Training, screening and evaluation join as they land.
"""

from __future__ import annotations

import io
import logging
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from smartccs import layout
from smartccs.batches import BatchRef, is_committed, load_batch
from smartccs.data.tiles import STATUS_OK, StreamConfig, slide_rows, tile_stream
from smartccs.errors import AlreadyCommittedError
from smartccs.labels import has_cell_labels, put_cell_labels
from smartccs.manifest import MANIFEST_NAME, Manifest
from smartccs.store import Store, StoreConfig
from smartccs.upload import upload_batch

log = logging.getLogger(__name__)


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    store: str | None = Field(default=None, description="store URI; $CCS_STORE or ./ccs-data")
    cohort_dir: str = Field(default="./ccs-cohort", description="where slides are generated")
    centers: int = Field(default=3, ge=1)
    slides_per_center: int = Field(default=4, ge=1)
    size: Literal["tiny", "small", "medium", "large"] = "tiny"
    seed: int = 0
    address: str | None = Field(default=None, description="Ray address; local Ray if unset")
    stream: StreamConfig = StreamConfig()


class SlideSummary(BaseModel):
    center: str
    batch: str
    slide_id: str
    status: str
    error: str
    tiles: int
    tiles_read: int
    background_fraction: float
    blur: float
    mean_od: float


def generated_centers(cohort_dir: Path) -> list[Path]:
    return sorted(p.parent for p in cohort_dir.glob(f"*/{MANIFEST_NAME}"))


def ensure_uploaded(store: Store, center_dir: Path, center: str, batch: str) -> BatchRef:
    """Upload a generated center once, with its cell annotations; re-runs reuse the batch."""
    ref = _ensure_batch(store, center_dir, center, batch)
    cells = center_dir / "ground_truth" / "cells.parquet"
    if cells.is_file() and not has_cell_labels(store, center, batch):
        put_cell_labels(store, ref, cells)
    return ref


def _ensure_batch(store: Store, center_dir: Path, center: str, batch: str) -> BatchRef:
    if is_committed(store, center, batch):
        ref = load_batch(store, center, batch)
        local = Manifest.loads((center_dir / MANIFEST_NAME).read_bytes())
        if {s.sha256 for s in ref.manifest.slides} != {s.sha256 for s in local.slides}:
            raise AlreadyCommittedError(
                f"{store.uri(ref.prefix)} holds different slides than {center_dir}; "
                "use another --store or --seed"
            )
        log.info("%s/%s already uploaded, reusing it", center, batch)
        return ref
    return upload_batch(center_dir, center=center, batch=batch, store=store)


def summarise_tiles(ds, expected_slides: int) -> list[SlideSummary]:
    """Consume the tile stream, keeping per-slide aggregates only (pixels are dropped)."""
    acc: dict[tuple[str, str, str], dict] = defaultdict(
        lambda: {"tiles": 0, "read": 0, "bg": [], "blur": [], "od": [], "errors": []}
    )
    bar = tqdm(desc="reading tiles", unit="tile", total=0)
    seen: set[tuple[str, str, str]] = set()
    for batch in ds.iter_batches(batch_size=32, batch_format="numpy"):
        for i in range(len(batch["slide_id"])):
            k = (str(batch["center"][i]), str(batch["batch"][i]), str(batch["slide_id"][i]))
            a = acc[k]
            if k not in seen:
                seen.add(k)
                a["tiles"] = int(batch["n_tiles"][i])
                bar.total += max(1, a["tiles"])
            if batch["status"][i] == STATUS_OK:
                a["read"] += 1
                a["bg"].append(batch["background_fraction"][i])
                a["blur"].append(batch["blur"][i])
                a["od"].append(batch["mean_od"][i])
            else:
                a["errors"].append(str(batch["error"][i]))
            bar.update(1)
    bar.close()
    if len(acc) != expected_slides:
        log.warning("expected %d slides in the stream, saw %d", expected_slides, len(acc))

    def mean(v: list) -> float:
        return float(np.mean(v)) if v else float("nan")

    return [
        SlideSummary(
            center=c,
            batch=b,
            slide_id=s,
            status="ok" if not a["errors"] else "error",
            error=a["errors"][0] if a["errors"] else "",
            tiles=a["tiles"],
            tiles_read=a["read"],
            background_fraction=mean(a["bg"]),
            blur=mean(a["blur"]),
            mean_od=mean(a["od"]),
        )
        for (c, b, s), a in sorted(acc.items())
    ]


def write_summary(store: Store, run_id: str, rows: list[SlideSummary]) -> str:
    table = pa.Table.from_pylist([r.model_dump() for r in rows])
    buf = io.BytesIO()
    pq.write_table(table, buf)
    key = f"{layout.run(run_id)}/tile_summary.parquet"
    store.write_bytes(key, buf.getvalue())
    return store.uri(key)


def format_summary(rows: list[SlideSummary]) -> str:
    by_center: dict[str, list[SlideSummary]] = defaultdict(list)
    for r in rows:
        by_center[r.center].append(r)
    lines = [
        f"{'center':<10} {'slides':>6} {'failed':>6} {'tiles':>7} {'bg frac':>8} {'blur':>8}",
    ]
    for c, rs in sorted(by_center.items()):
        ok = [r for r in rs if r.status == "ok"]
        lines.append(
            f"{c:<10} {len(rs):>6} {len(rs) - len(ok):>6} {sum(r.tiles_read for r in rs):>7} "
            f"{np.nanmean([r.background_fraction for r in ok] or [np.nan]):>8.3f} "
            f"{np.nanmean([r.blur for r in ok] or [np.nan]):>8.1f}"
        )
    lines += [f"  {r.center}/{r.slide_id}: {r.error}" for r in rows if r.status != "ok"]
    return "\n".join(lines)


def run_demo(cfg: DemoConfig) -> str:
    """Run the demo; return the URI of the summary it wrote."""
    from smartccs.raycluster import init_ray
    from smartccs.synth.cohort import generate_cohort

    store = Store(StoreConfig.from_env(cfg.store))
    cohort = Path(cfg.cohort_dir)
    log.info("generating a synthetic cohort in %s (synthetic data, not patient slides)", cohort)
    generate_cohort(
        cohort,
        centers=cfg.centers,
        slides_per_center=cfg.slides_per_center,
        size=cfg.size,
        seed=cfg.seed,
    )
    batch = f"demo-{cfg.size}-seed{cfg.seed}"
    refs = [ensure_uploaded(store, d, d.name, batch) for d in generated_centers(cohort)]
    init_ray(cfg.address)
    rows = slide_rows(refs)
    ds = tile_stream(rows, store.config, cfg.stream)
    summary = summarise_tiles(ds, expected_slides=len(rows))
    run_id = f"demo-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    uri = write_summary(store, run_id, summary)
    print(format_summary(summary))
    print(f"\nper-slide tile summary (synthetic cohort): {uri}")
    return uri
