"""Pretraining throughput: tiles/s of the DINO step the job runs, on this machine's CPU.

Times ``smartccs.train.pretrain.Learner.step`` (multi-crop, student and teacher forward,
backward, AdamW, EMA) with the demo job's config on real tiles read from a synthetic slide, in
one process with ``torch`` using ``--threads`` threads. The Ray Train job adds the tile stream
around it (see docs/benchmarks.md). On a GPU machine, ``--device cuda`` runs the same step
with the config's bfloat16 autocast.

    python bench/pretrain_throughput.py
    python bench/pretrain_throughput.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from slides import write_bench_slide

from smartccs.slide.reader import open_slide
from smartccs.slide.tiling import plan_tiles, read_tile
from smartccs.train.normalization import tile_statistics
from smartccs.train.pretrain import Learner, PretrainConfig

OUT = Path(__file__).resolve().parent / "out"
CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "pretrain-demo.yaml"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    command = "python bench/pretrain_throughput.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    torch.set_num_threads(args.threads)

    raw = yaml.safe_load(CONFIG.read_text())
    raw["store"] = {"uri": str(OUT / "unused-store")}
    raw["scaling"]["use_gpu"] = args.device.startswith("cuda")
    cfg = PretrainConfig.model_validate(raw)
    slide_path = OUT / "synth-8k-f2.svs"
    if not slide_path.exists():
        write_bench_slide(slide_path, side_px=8000)
    with open_slide(slide_path) as slide:
        specs = plan_tiles(slide, cfg.stream.tiling).tiles[:256]
        tiles = np.stack([read_tile(slide, s, cfg.stream.tiling) for s in specs])
    norm = tile_statistics([tiles], len(tiles))
    cfg = cfg.model_copy(update={"crops": cfg.crops.model_copy(update={"normalization": norm})})

    torch.manual_seed(0)
    learner = Learner(cfg, torch.device(args.device))
    learner.prepare()
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    b = cfg.batch_size

    def batch() -> np.ndarray:
        return tiles[rng.choice(len(tiles), b, replace=False)]

    for step in range(3):  # warm-up
        learner.step(batch(), step, gen)
    rates = []
    for r in range(args.repeats):
        start = time.perf_counter()
        for k in range(args.steps):
            learner.step(batch(), 3 + r * args.steps + k, gen)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        rates.append(args.steps * b / (time.perf_counter() - start))
    med = statistics.median(rates)
    print(
        f"\nDINO step, demo config ({cfg.encoder.timm_name} {cfg.encoder.kwargs}), "
        f"batch {b} tiles of {cfg.stream.tiling.tile_px} px, {cfg.crops.n_crops} crops, "
        f"{args.device}, {args.threads} threads"
    )
    print(
        f"  {med:.1f} tiles/s (median of {args.repeats} x {args.steps} steps; all: "
        f"{[round(x, 1) for x in rates]})"
    )
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / f"pretrain_throughput-{args.device}-t{args.threads}.json"
    out.write_text(json.dumps({"command": command, "tiles_per_s": rates, "median": med}))
    print(f"\nreproduce: {command}\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
