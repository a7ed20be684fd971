"""A full-size slide screened end to end: tiles, wall time, memory per process, object store.

The slide is the cohort generator's ``medium`` (8 mm, 32,000 px) or ``large`` (20 mm, 80,000
px) extent at 0.25 µm/px (or ``tiny``, 1 mm, for a batch's fixed cost), an HSIL specimen
written tile by tile (``bench/slides.py``), uploaded as a one-slide batch and screened by
``screen_batches`` with the fused engine and the demo-size models of ``bench/screening.py``
(random weights, score floor 0.001: every tile sends its full quota of crops to the embedder).
Nothing is read ahead: the run starts from the committed batch on a running Ray, as the batch
job does. Memory is sampled by ``monitor.Monitor`` (every process, every 0.2 s; the object
store every 0.5 s), so the largest single process and the object store's peak show whether
memory grows with the slide.

    python bench/full_slide.py --size medium --repeats 2
    python bench/full_slide.py --size large --repeats 1 --tag cpu2-large
    python bench/full_slide.py --size tiny --repeats 3 --tag cpu2-tiny
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import statistics
import sys

import ray
from screening import (
    CACHE,
    OUT,
    TILES_PER_CALL,
    bench_batch,
    bench_slides,
    demo_models,
    measure_e2e,
    medians,
    pin_cpus,
)

from smartccs.data.tiles import StreamConfig
from smartccs.engine.config import ScorerPool, ScreeningConfig
from smartccs.models.artifacts import load_card
from smartccs.raycluster import init_ray
from smartccs.screening.slides import AdequacyConfig, SlideClassifier
from smartccs.store import Store, StoreConfig
from smartccs.synth.scan import SIZES_UM

MPP = 0.25
WORK = OUT / "full_slide"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=list(SIZES_UM), default="medium")
    ap.add_argument("--cpus", type=int, default=2, help="scorer actors (1 CPU each)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--tag", default=None, help="output name: bench/out/full_slide-<tag>.json")
    args = ap.parse_args(argv)
    command = "python bench/full_slide.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("smartccs.engine").setLevel(logging.INFO)  # progress of a long run

    pinned = pin_cpus(args.cpus, True)
    side_px = round(SIZES_UM[args.size] / MPP)
    store = Store(StoreConfig(uri=str(WORK / "store")))
    ref = bench_batch(store, bench_slides(1, side_px))
    model = demo_models(store)
    classifier = SlideClassifier(store, model)
    tiling = load_card(store, classifier.detector.name, classifier.detector.version).tiling
    cfg = ScreeningConfig(
        classifier_model=model.name,
        classifier_version=model.version,
        stream=StreamConfig(tiling=tiling, planner_cpus=0.25, batch_size=TILES_PER_CALL,
                            cache_dir=CACHE),
        scorers=ScorerPool(actors=args.cpus, cpus=1, batch_size=TILES_PER_CALL, fused=True),
        adequacy=AdequacyConfig(min_squamous=0),  # random models count no squamous cells
    )  # fmt: skip
    init_ray(num_cpus=args.cpus + 2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    runs = []
    for rep in range(args.repeats):
        print(f"run {rep + 1}/{args.repeats}: one {args.size} slide ({side_px} px) ...", flush=True)
        runs.append(measure_e2e(store, ref, cfg, gpu=False))
    med = medians(runs)
    titles = {t for r in runs for t in r["cpu_s_by_process"]}
    cpu = {t: statistics.median(r["cpu_s_by_process"].get(t, 0.0) for r in runs) for t in titles}
    cpu = dict(sorted(cpu.items(), key=lambda kv: -kv[1]))
    result = {
        "command": command,
        "settings": {
            "size": args.size,
            "side_px": side_px,
            "slide_mpp": MPP,
            "tiling": tiling.model_dump(),
            "cpus": args.cpus,
            "pinned_cores": pinned,
            "scorers": cfg.scorers.model_dump(),
            "models": "random weights, demo sizes (bench/screening.py DEMO)",
            "repeats": args.repeats,
        },
        "runs": runs,
        "median": med,
        "cpu_s_by_process_median": cpu,
    }
    print(
        f"\none {args.size} slide, {side_px} px at {MPP} µm/px: {med['tiles']:.0f} tiles in "
        f"{med['wall_s']:.1f} s = {med['tiles_per_s']:.1f} tiles/s (median of {args.repeats}); "
        f"scorers busy {med['worker_busy']:.0%}\n"
        f"  largest process {med['peak_worker_process_rss_mb']:.0f} MB "
        f"({runs[0]['peak_worker_process']}), driver {med['peak_driver_rss_mb']:.0f} MB, "
        f"driver + workers {med['peak_rss_mb']:.0f} MB, object store peak "
        f"{med['peak_object_store_mb']:.1f} MB\n"
        "  CPU-s by process: " + ", ".join(f"{t} {v:.1f}" for t, v in cpu.items() if v >= 0.2)
    )
    out = OUT / f"full_slide-{args.tag or args.size}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"\nreproduce: {command}\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
