"""Read stage on Ray Data: tiles/s per reader core, beside raw OpenSlide on the same tiles.

``bench/read_stage.py`` measures the library's per-tile read in one process; this measures
the whole stage as screening runs it: planning tasks, the reader actor pool, batching and the
object store, consumed by a driver that drops the pixels. Per core = tiles/s / reader actors
(each reserves one CPU). Raw = one process calling ``read_region`` for the same planned tiles
at the same level and size, with no resampling, QC or Ray.

    python bench/tile_stream.py                 # 20k x 20k px slide at 0.5 um/px, 1 reader
    python bench/tile_stream.py --readers 2
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import openslide
from slides import write_bench_slide

from smartccs.batches import is_committed, load_batch
from smartccs.data.tiles import STATUS_OK, StreamConfig, slide_rows, tile_stream
from smartccs.raycluster import init_ray
from smartccs.slide.reader import open_slide
from smartccs.slide.tiling import TilingConfig, plan_tiles
from smartccs.store import Store, StoreConfig
from smartccs.upload import upload_batch

OUT = Path(__file__).resolve().parent / "out"


def raw_rate(path: Path, tiles, d: float) -> float:
    """Tiles/s of bare ``read_region`` over the planned tiles, one process, fresh handle."""
    osr = openslide.OpenSlide(str(path))
    start = time.perf_counter()
    for t in tiles:
        osr.read_region((t.x0, t.y0), t.level, (round(t.w0 / d), round(t.h0 / d)))
    rate = len(tiles) / (time.perf_counter() - start)
    osr.close()
    return rate


def stream_rate(rows, store: Store, cfg: StreamConfig) -> tuple[float, float, int]:
    """(tiles/s over the whole run, tiles/s after the first batch arrived, tiles) of a run."""
    start = time.perf_counter()
    first = None
    n = 0
    ds = tile_stream(rows, store.config, cfg)
    for batch in ds.iter_batches(batch_size=cfg.batch_size, batch_format="numpy"):
        assert (batch["status"] == STATUS_OK).all(), batch["error"]
        if first is None:
            first, first_n = time.perf_counter(), len(batch["status"])
        n += len(batch["status"])
    end = time.perf_counter()
    return n / (end - start), (n - first_n) / (end - first), n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=20_000, help="synthetic slide side, px")
    ap.add_argument("--readers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    command = "python bench/tile_stream.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )

    src = OUT / "stream-slide-synth"
    slide_path = src / "s1.svs"
    if not slide_path.exists():
        src.mkdir(parents=True, exist_ok=True)
        print(f"writing {slide_path} ...", flush=True)
        write_bench_slide(slide_path, side_px=args.size)
    # level 0 declared at the target mpp: tiles are read 600 px from level 0, as raw is
    tiling = TilingConfig()
    store = Store(StoreConfig(uri=str(OUT / "stream-store")))
    batch = f"b{args.size}"
    ref = (
        load_batch(store, "bench", batch)
        if is_committed(store, "bench", batch)
        else upload_batch(src, center="bench", batch=batch, store=store, progress=False)
    )
    rows = slide_rows([ref])
    for row in rows:
        row["mpp_override"] = tiling.target_mpp
    with open_slide(slide_path, mpp_override=tiling.target_mpp) as slide:
        tiles = plan_tiles(slide, tiling).tiles
        d = slide.info.level_downsamples[tiles[0].level]
    cfg = StreamConfig(
        tiling=tiling, readers=args.readers, reader_cpus=1.0, cache_dir=str(OUT / "cache")
    )
    init_ray(num_cpus=args.readers + 2)
    stream_rate(rows, store, cfg)  # warm-up: actor start-up, page cache
    raw, whole, steady = [], [], []
    for _ in range(args.repeats):
        raw.append(raw_rate(slide_path, tiles, d))
        w, s, n = stream_rate(rows, store, cfg)
        assert n == len(tiles), (n, len(tiles))
        whole.append(w)
        steady.append(s)
    med = {k: statistics.median(v) for k, v in (("raw", raw), ("whole", whole), ("steady", steady))}
    per_core = {k: med[k] / args.readers for k in ("whole", "steady")}
    result = {
        "command": command,
        "tiles": len(tiles),
        "tile_px": tiling.tile_px,
        "readers": args.readers,
        "raw_tiles_per_s": raw,
        "stream_tiles_per_s": whole,
        "stream_steady_tiles_per_s": steady,
        "median": med,
        "per_core_ratio_whole": per_core["whole"] / med["raw"],
        "per_core_ratio_steady": per_core["steady"] / med["raw"],
    }
    print(
        f"\n{len(tiles)} tiles of {tiling.tile_px} px, {args.readers} reader actor(s), "
        f"median of {args.repeats}"
    )
    print(f"  raw read_region, 1 process     {med['raw']:8.1f} tiles/s")
    print(
        f"  Ray Data stream, whole run     {med['whole']:8.1f} tiles/s "
        f"({per_core['whole']:.1f}/core, {result['per_core_ratio_whole']:.3f} of raw)"
    )
    print(
        f"  Ray Data stream, steady state  {med['steady']:8.1f} tiles/s "
        f"({per_core['steady']:.1f}/core, {result['per_core_ratio_steady']:.3f} of raw)"
    )
    out = OUT / f"tile_stream-r{args.readers}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"\nreproduce: {command}\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
