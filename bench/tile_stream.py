"""Read stage on Ray Data: tiles/s per reader core, beside raw OpenSlide on the same tiles.

``bench/read_stage.py`` measures the library's per-tile read in one process; this measures
the whole stage as screening runs it: planning tasks, the reader actor pool, batching and the
object store, consumed by a driver that drops the pixels. Per core = tiles per CPU-second the
reader actors spent, from Ray Data's own operator stats; the whole-run wall rate (with Ray's
worker and actor start-up) is reported beside it. Raw = one process calling ``read_region``
for the same planned tiles at the same level and size, with no resampling, QC or Ray.

    python bench/tile_stream.py                 # 20k x 20k px slide at 0.5 um/px, 1 reader
    python bench/tile_stream.py --readers 2
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import openslide
from slides import write_bench_slide

from smartccs.batches import is_committed, load_batch
from smartccs.checksums import sha256_file
from smartccs.data.tiles import STATUS_OK, StreamConfig, slide_rows, tile_stream
from smartccs.raycluster import init_ray
from smartccs.slide.reader import open_slide
from smartccs.slide.tiling import TilingConfig, plan_tiles
from smartccs.store import Store, StoreConfig
from smartccs.upload import upload_batch

OUT = Path(__file__).resolve().parent / "out"


def raw_rate(path: Path, tiles, d: float) -> float:
    """Tiles per CPU-second of bare ``read_region`` over the planned tiles, one process."""
    osr = openslide.OpenSlide(str(path))
    start = time.process_time()
    for t in tiles:
        osr.read_region((t.x0, t.y0), t.level, (round(t.w0 / d), round(t.h0 / d)))
    rate = len(tiles) / (time.process_time() - start)
    osr.close()
    return rate


_READER_CPU = re.compile(
    r"MapBatches\(TileReader\).*?Remote cpu time: [^\n]*?([\d.]+)(ms|s|us) total", re.S
)


def reader_cpu_seconds(stats: str) -> float:
    """CPU time the reader actors spent in their batches, from Ray Data's own stats."""
    m = _READER_CPU.search(stats)
    if not m:
        raise RuntimeError(f"no TileReader CPU time in Ray Data stats:\n{stats}")
    return float(m.group(1)) * {"s": 1.0, "ms": 1e-3, "us": 1e-6}[m.group(2)]


def stream_run(rows, store: Store, cfg: StreamConfig) -> dict:
    """Wall rate, time to the first batch and reader CPU rate of one run of the stream."""
    start = time.perf_counter()
    first = None
    n = 0
    ds = tile_stream(rows, store.config, cfg)
    for batch in ds.iter_batches(batch_size=cfg.batch_size, batch_format="numpy"):
        assert (batch["status"] == STATUS_OK).all(), batch["error"]
        first = first or time.perf_counter() - start
        n += len(batch["status"])
    wall = time.perf_counter() - start
    cpu = reader_cpu_seconds(ds.stats())
    return {"tiles": n, "wall_rate": n / wall, "first_batch_s": first, "cpu_rate": n / cpu}


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
    batch = f"b{args.size}-{sha256_file(slide_path)[:12]}"  # a new slide, a new batch
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
    stream_run(rows, store, cfg)  # warm-up: page cache, worker processes
    raw, runs = [], []
    for _ in range(args.repeats):
        raw.append(raw_rate(slide_path, tiles, d))
        runs.append(stream_run(rows, store, cfg))
        assert runs[-1]["tiles"] == len(tiles), (runs[-1]["tiles"], len(tiles))
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "tiles"}
    med["raw"] = statistics.median(raw)
    result = {
        "command": command,
        "tiles": len(tiles),
        "tile_px": tiling.tile_px,
        "readers": args.readers,
        "raw_tiles_per_cpu_s": raw,
        "runs": runs,
        "median": med,
        "reader_per_core_ratio": med["cpu_rate"] / med["raw"],
        "wall_per_core_ratio": med["wall_rate"] / args.readers / med["raw"],
    }
    print(
        f"\n{len(tiles)} tiles of {tiling.tile_px} px, {args.readers} reader actor(s), "
        f"median of {args.repeats}"
    )
    print(f"  raw read_region, 1 process       {med['raw']:8.1f} tiles/CPU-s")
    print(
        f"  stream reader actors (Ray stats) {med['cpu_rate']:8.1f} tiles/CPU-s "
        f"({result['reader_per_core_ratio']:.3f} of raw)"
    )
    print(
        f"  stream whole run, wall           {med['wall_rate']:8.1f} tiles/s "
        f"({result['wall_per_core_ratio']:.3f} of raw per reader; first batch after "
        f"{med['first_batch_s']:.1f} s)"
    )
    out = OUT / f"tile_stream-r{args.readers}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"\nreproduce: {command}\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
