"""Review viewer tiles: latency of Deep Zoom tiles of a committed synthetic slide.

A child process generates one synthetic slide (``generate_cohort``, one center, one slide of
``--size``) and uploads it as a committed batch, both timed; this process then does nothing
but serve tiles of it through ``smartccs.slide.deepzoom.DeepZoomSlides``, so its peak RSS is
the viewer's. Measured:

- cold: the first tile request of a fresh ``DeepZoomSlides`` (manifest, slide cache, open,
  one tile; with ``--store moto`` the cache downloads the slide from S3), ``--cold`` times;
- warm: ``--requests`` random tiles over the deepest ``--levels`` Deep Zoom levels of the open
  slide, one after another, ``--repeats`` times: the median of the repeats' medians, and p95;
- concurrent: the same requests from ``--threads`` threads at once (a browser asks for about
  six tiles at a time; FastAPI runs sync routes in a threadpool): tiles/s and median latency.

    PYTHONPATH=platform .venv/bin/python bench/review_tiles.py --size small
    PYTHONPATH=platform .venv/bin/python bench/review_tiles.py --size large --store moto
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openslide

from smartccs.slide.cache import SlideCache
from smartccs.slide.deepzoom import DeepZoomSlides, SlideView
from smartccs.store import S3Options, Store, StoreConfig

OUT = Path(__file__).resolve().parent / "out"
CENTER, BATCH = "bench", "b1"
MOTO = {"region": "us-east-1", "access_key_id": "testing", "secret_access_key": "testing"}


def _store(uri: str, endpoint: str | None) -> Store:
    s3 = S3Options(endpoint_url=endpoint, **MOTO) if endpoint else None
    return Store(StoreConfig(uri=uri, s3=s3) if s3 else StoreConfig(uri=uri))


def prepare(folder: Path, size: str, seed: int, uri: str, endpoint: str | None) -> dict:
    """Generate the slide and commit it as ``bench/b1``: runs in the child process."""
    from smartccs.synth.cohort import generate_cohort
    from smartccs.upload import upload_batch

    started = time.perf_counter()
    generated = None  # reused
    if not any(folder.glob("*/manifest.json")):
        generate_cohort(
            folder, centers=1, slides_per_center=1, size=size, seed=seed, workers=1, progress=False
        )
        generated = time.perf_counter() - started
    batch = next(p.parent for p in folder.glob("*/manifest.json"))
    started = time.perf_counter()
    ref = upload_batch(
        batch, center=CENTER, batch=BATCH, store=_store(uri, endpoint), progress=False
    )
    entry = ref.manifest.slides[0]
    return {
        "generate_s": generated,
        "upload_s": time.perf_counter() - started,
        "slide_id": entry.slide_id,
        "slide_bytes": entry.bytes,
    }


def _tiles(view: SlideView, levels: int, n: int, seed: int) -> list[tuple[int, int, int]]:
    """``n`` random (level, col, row) over the deepest ``levels`` levels."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        level = rng.randrange(view.levels - levels, view.levels)
        scale = 2 ** (view.levels - 1 - level)
        cols = math.ceil(math.ceil(view.width / scale) / view.tile_size)
        rows = math.ceil(math.ceil(view.height / scale) / view.tile_size)
        out.append((level, rng.randrange(cols), rng.randrange(rows)))
    return out


def _timed(viewer: DeepZoomSlides, slide_id: str, tile: tuple[int, int, int]) -> float:
    started = time.perf_counter()
    viewer.tile(CENTER, BATCH, slide_id, *tile)
    return (time.perf_counter() - started) * 1000


def _p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def cold(store: Store, cache: SlideCache, slide_id: str, runs: int) -> dict:
    """The viewer's first two requests on a slide nobody has open: its description (which
    opens it: manifest, slide cache, OpenSlide) and then one tile of its deepest level."""
    opens, firsts, cached = [], [], []
    for _ in range(runs):
        with DeepZoomSlides(store, cache) as viewer:  # a fresh one: nothing open
            started = time.perf_counter()
            view = viewer.describe(CENTER, BATCH, slide_id)
            opens.append((time.perf_counter() - started) * 1000)
            firsts.append(_timed(viewer, slide_id, (view.levels - 1, 0, 0)))
        cached.append(cache.total_bytes())
    return {"cold_open_ms": opens, "cold_first_tile_ms": firsts, "slide_cache_bytes": cached}


def warm(store: Store, cache: SlideCache, slide_id: str, args: argparse.Namespace) -> dict:
    """Random tiles of the open slide, one at a time, then from ``args.threads`` threads."""
    with DeepZoomSlides(store, cache) as viewer:
        view = viewer.describe(CENTER, BATCH, slide_id)
        medians, every = [], []
        for rep in range(args.repeats):
            tiles = _tiles(view, args.levels, args.requests, args.seed + rep)
            ms = [_timed(viewer, slide_id, t) for t in tiles]
            medians.append(statistics.median(ms))
            every += ms
        tiles = _tiles(view, args.levels, args.requests, args.seed + args.repeats)
        with ThreadPoolExecutor(args.threads) as pool:
            started = time.perf_counter()
            together = list(pool.map(lambda t: _timed(viewer, slide_id, t), tiles))
            wall = time.perf_counter() - started
    return {
        "view": view.model_dump(exclude={"dzi"}),
        "warm_ms_medians": medians,
        "warm_ms_median": statistics.median(medians),
        "warm_ms_p95": _p(every, 95),
        "concurrent_tiles_per_s": len(tiles) / wall,
        "concurrent_ms_median": statistics.median(together),
    }


def _moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server in its own process (its memory is not the viewer's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    import boto3

    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket="bench")
    return proc, endpoint


def _rss_mib() -> float:
    """This process's resident memory now (VmRSS), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _generated(prep: dict) -> str:
    seconds = prep["generate_s"]
    return "generated earlier (--cohort)" if seconds is None else f"generated in {seconds:.0f} s"


def _report(res: dict, prep: dict, args: argparse.Namespace, command: str) -> None:
    v = res["view"]
    print(
        f"\n{args.size} slide: {v['slide_width']} x {v['slide_height']} px, "
        f"{prep['slide_bytes'] / 1e6:.0f} MB, {v['levels']} Deep Zoom levels; store "
        f"{args.store}; {_generated(prep)}, uploaded in "
        f"{prep['upload_s']:.1f} s"
    )
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python "
        f"{platform.python_version()}, openslide {openslide.__library_version__}"
    )

    def each(values: list[float]) -> str:
        return ", ".join(f"{x:.1f}" for x in values) + " ms"

    rows = [
        ("cold: open (describe), each fresh viewer", each(res["cold_open_ms"])),
        ("cold: then first deepest tile", each(res["cold_first_tile_ms"])),
        (f"warm: median of {args.repeats} medians", f"{res['warm_ms_median']:.2f} ms"),
        ("warm: per repeat", ", ".join(f"{x:.2f}" for x in res["warm_ms_medians"]) + " ms"),
        ("warm: p95 of all", f"{res['warm_ms_p95']:.2f} ms"),
        (f"{args.threads} threads: tiles/s", f"{res['concurrent_tiles_per_s']:.0f}"),
        (f"{args.threads} threads: median latency", f"{res['concurrent_ms_median']:.2f} ms"),
        ("peak RSS of this process", f"{res['peak_rss_mib']:.0f} MiB"),
        ("  of which before any slide was opened", f"{res['rss_before_mib']:.0f} MiB"),
        (
            "slide cache bytes after each cold open",
            ", ".join(f"{b / 1e6:.1f}" for b in res["slide_cache_bytes"]) + " MB",
        ),
    ]
    for name, value in rows:
        print(f"  {name:42s} {value}")
    print(f"warm target < 50 ms median: {'met' if res['warm_ms_median'] < 50 else 'NOT met'}")
    print(f"\nreproduce: {command}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="small", choices=["tiny", "small", "medium", "large"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--store",
        default="local",
        choices=["local", "moto"],
        help="on disk (slides read in place) or moto's S3 (cached)",
    )
    ap.add_argument("--requests", type=int, default=200, help="tiles per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--levels", type=int, default=3, help="deepest Deep Zoom levels asked")
    ap.add_argument("--cold", type=int, default=3, help="fresh viewers timed")
    ap.add_argument("--threads", type=int, default=6)
    ap.add_argument(
        "--cohort",
        type=Path,
        default=None,
        help="keep the generated slide here, or reuse the one already there",
    )
    ap.add_argument("--json", type=Path, default=None, help="default bench/out/review_tiles-*")
    ap.add_argument("--prepare", nargs=3, help=argparse.SUPPRESS)  # child: folder uri endpoint
    args = ap.parse_args(argv)
    if args.prepare:
        folder, uri, endpoint = args.prepare
        print(json.dumps(prepare(Path(folder), args.size, args.seed, uri, endpoint or None)))
        return 0
    command = "PYTHONPATH=platform python bench/review_tiles.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    moto = None
    with tempfile.TemporaryDirectory(prefix="review-tiles-") as tmp:
        try:
            if args.store == "moto":
                moto, endpoint = _moto()
                uri = "s3://bench/store"
            else:
                endpoint, uri = "", str(Path(tmp) / "store")
            child = [
                sys.executable,
                __file__,
                "--size",
                args.size,
                "--seed",
                str(args.seed),
                "--prepare",
                str(args.cohort or Path(tmp) / "cohort"),
                uri,
                endpoint,
            ]
            print(f"generating and uploading one {args.size} slide ...", flush=True)
            out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
            prep = json.loads(out.strip().splitlines()[-1])
            store = _store(uri, endpoint or None)
            rss_before = _rss_mib()
            cache = SlideCache(Path(tmp) / "cache", max_bytes=4 * prep["slide_bytes"])
            res = cold(store, cache, prep["slide_id"], args.cold)
            res |= warm(store, cache, prep["slide_id"], args)
        finally:
            if moto is not None:
                moto.terminate()
                moto.wait()
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["rss_before_mib"] = rss_before
    _report(res, prep, args, command)
    path = args.json or OUT / f"review_tiles-{args.size}-{args.store}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"command": command, "prepare": prep, **res}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
