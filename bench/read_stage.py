"""Read-stage throughput: the library's tile reads against raw OpenSlide, one core.

The read stage feeds the detector, and on CPU machines it is what bounds a screening run; the
library adds a pixel-size-aware level choice, compositing onto white, resampling and per-tile
QC on top of OpenSlide's ``read_region``, and must keep at least 90% of its throughput.

Two scans of the same glass are measured on one file (the second via an mpp override):

- 0.5 µm/px scan: raw ``read_region`` of the 600 px level-0 tile vs ``read_tile``
  (the same read, as a read-only array) and ``read_tile`` + ``tile_qc``;
- 0.25 µm/px scan: raw ``read_region`` of the 1200 px level-0 tile (what the reference
  pipeline read) vs ``read_tile`` (the coarsest adequate level, resampled to 600 px), and raw
  ``read_region`` of exactly what ``read_tile`` reads, to isolate the per-tile overhead.

Each method gets its own slide handle (OpenSlide's tile cache is per handle), methods run in
rotating order, and the median of the repeats is reported, per CPU second (the per-core figure,
robust to other work sharing the machine) and per wall second.

    python bench/read_stage.py                    # writes bench/out/synth-20k-f2.svs once
    python bench/read_stage.py --pyramid-factor 4 # Aperio-style 4x pyramid: level 0 + reduce
    python bench/read_stage.py --slide some.svs   # any slide with an mpp (e.g. a synth one)
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openslide
from slides import write_bench_slide

from smartccs.slide.qc import tile_qc
from smartccs.slide.reader import open_slide
from smartccs.slide.tiling import TileSpec, TilingConfig, plan_tiles, read_tile

OUT = Path(__file__).resolve().parent / "out"


def _sample(tiles: list[TileSpec], n: int) -> list[TileSpec]:
    """``n`` tiles spread evenly over the plan (reads far apart, like a real pass)."""
    if len(tiles) <= n:
        return tiles
    return [tiles[int(i)] for i in np.linspace(0, len(tiles) - 1, n)]


def _measure(
    methods: dict[str, Callable[[], Callable[[TileSpec], object]]],
    tiles: list[TileSpec],
    repeats: int,
) -> dict[str, dict[str, list[float]]]:
    """tiles/s per repeat per method, per CPU second and per wall second.

    CPU time is the per-core figure: it does not count time this process spent waiting for
    a core, so it stays meaningful on a machine other work shares (wall time is kept too).
    Each method gets a fresh handle per repeat; the order rotates between repeats.
    """
    rates: dict[str, dict[str, list[float]]] = {n: {"cpu": [], "wall": []} for n in methods}
    names = list(methods)
    for rep in range(repeats + 1):  # the first pass warms the page cache and is dropped
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            fn = methods[name]()
            cpu, wall = time.process_time(), time.perf_counter()
            for spec in tiles:
                fn(spec)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            if rep:
                rates[name]["cpu"].append(len(tiles) / cpu)
                rates[name]["wall"].append(len(tiles) / wall)
    return rates


def _raw(path: Path, level_of: Callable[[TileSpec], tuple[int, int, int]]):
    def make() -> Callable[[TileSpec], object]:
        osr = openslide.OpenSlide(path)

        def read(spec: TileSpec) -> object:
            level, w, h = level_of(spec)
            return osr.read_region((spec.x0, spec.y0), level, (w, h))

        return read

    return make


def _lib(path: Path, mpp: float | None, cfg: TilingConfig, qc: bool):
    def make() -> Callable[[TileSpec], object]:
        slide = open_slide(path, mpp_override=mpp)

        def read(spec: TileSpec) -> object:
            tile = read_tile(slide, spec, cfg)
            return tile_qc(tile) if qc else tile

        return read

    return make


def scenario(path: Path, mpp: float | None, cfg: TilingConfig, n: int, repeats: int) -> dict:
    with open_slide(path, mpp_override=mpp) as slide:
        plan = plan_tiles(slide, cfg)
        downsamples = slide.info.level_downsamples
        scan_mpp = slide.info.mpp
    tiles = _sample(plan.tiles, n)
    level = tiles[0].level
    d = downsamples[level]
    read_px = round(tiles[0].w0 / d)
    methods = {
        f"raw read_region L0 {tiles[0].w0}px": _raw(path, lambda s: (0, s.w0, s.h0)),
        "read_tile": _lib(path, mpp, cfg, qc=False),
        "read_tile + tile_qc": _lib(path, mpp, cfg, qc=True),
    }
    if level != 0:
        methods[f"raw read_region L{level} {read_px}px"] = _raw(
            path, lambda s: (level, read_px, read_px)
        )
    rates = _measure(methods, tiles, repeats)
    return {
        "scan_mpp": scan_mpp,
        "tiles": len(tiles),
        "tile_level": level,
        "tile_read_px": read_px,
        "tiles_per_cpu_s_median": {n: statistics.median(r["cpu"]) for n, r in rates.items()},
        "tiles_per_wall_s_median": {n: statistics.median(r["wall"]) for n, r in rates.items()},
        "tiles_per_s_all": rates,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slide", type=Path, help="slide to read (default: write a synthetic one)")
    ap.add_argument("--size", type=int, default=20_000, help="synthetic slide side, px")
    ap.add_argument("--pyramid-factor", type=int, default=2, choices=(2, 4))
    ap.add_argument("--tiles", type=int, default=150, help="tiles per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    command = "python bench/read_stage.py " + shlex.join(argv if argv is not None else sys.argv[1:])

    path = args.slide
    if path is None:
        path = OUT / f"synth-{args.size // 1000}k-f{args.pyramid_factor}.svs"
        if not path.exists():
            print(f"writing {path} ...", flush=True)
            write_bench_slide(path, side_px=args.size, pyramid_factor=args.pyramid_factor)
    cfg = TilingConfig()
    with open_slide(path) as slide:
        native = slide.info.mpp
    # the same file read as two scans: native (0.25) and with level 0 declared at 0.5 µm/px
    runs = {
        f"{mpp or native:g} um/px scan": scenario(path, mpp, cfg, args.tiles, args.repeats)
        for mpp in (cfg.target_mpp, None)
    }
    print(
        f"\nslide {path} ({path.stat().st_size / 1e6:.0f} MB), tiles {cfg.tile_px} px at "
        f"{cfg.target_mpp} um/px, {args.tiles} tiles x {args.repeats} repeats, one process"
    )
    print(
        f"{platform.processor() or platform.machine()}, python {platform.python_version()}, "
        f"openslide {openslide.__library_version__}"
    )
    for name, res in runs.items():
        med, wall = res["tiles_per_cpu_s_median"], res["tiles_per_wall_s_median"]
        raw0 = next(k for k in med if k.startswith("raw read_region L0"))
        prefix = f"raw read_region L{res['tile_level']} "
        same = next(k for k in med if k.startswith(prefix))
        print(f"\n{name}: read_tile reads level {res['tile_level']} at {res['tile_read_px']} px")
        print(f"  {'method':32s} {'tiles/CPU-s':>11s} {'tiles/s wall':>12s} {'vs raw L0':>9s}")
        for method, rate in med.items():
            ratio = rate / med[raw0]
            print(f"  {method:32s} {rate:11.1f} {wall[method]:12.1f} {ratio:9.3f}")
        if same != raw0:
            for method in ("read_tile", "read_tile + tile_qc"):
                print(f"  {method + ' vs ' + same:56s} {med[method] / med[same]:9.3f}")
    OUT.mkdir(parents=True, exist_ok=True)
    report = OUT / f"read_stage-{path.stem}.json"
    report.write_text(json.dumps({"command": command, "slide": str(path), "runs": runs}, indent=2))
    print(f"\nreproduce: {command}\nwrote {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
