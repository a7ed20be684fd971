"""Pretraining throughput: tiles/s of the DINO step the job runs, on a CPU or a GPU.

Times ``smartccs.train.pretrain.Learner.step`` (multi-crop, student and teacher forward,
backward, AdamW, EMA) with the demo job's config on real tiles read from a synthetic slide, in
one process with ``torch`` using ``--threads`` threads. The Ray Train job adds the tile stream
around it (see docs/benchmarks.md). On a GPU machine, ``--device cuda`` runs the same step
with the config's bfloat16 autocast (``--precision fp32`` turns it off for the ratio), and
``--config jobs/configs/pretrain-prod.yaml`` times the production ViT-L/14. The multi-crop
augmentation runs inside the step on the step's device; it is also timed alone, so a figure
says how much of the step it takes.

    python bench/pretrain_throughput.py
    python bench/pretrain_throughput.py --threads 1
    python bench/pretrain_throughput.py --device cuda --threads 16 \\
        --config jobs/configs/pretrain-prod.yaml --precision fp32
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
from smartccs.train.multicrop import multi_crop
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
    ap.add_argument("--config", type=Path, default=CONFIG, help="a pretrain-*.yaml")
    ap.add_argument(
        "--precision",
        choices=["config", "fp32"],
        default="config",
        help="fp32 turns the config's bfloat16 autocast off (it only applies on a GPU)",
    )
    ap.add_argument("--batch-size", type=int, default=None, help="default: the config's")
    args = ap.parse_args(argv)
    if not args.config.is_file():
        ap.error(f"--config {args.config}: no such file")
    command = "python bench/pretrain_throughput.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    torch.set_num_threads(args.threads)

    raw = yaml.safe_load(args.config.read_text())
    raw["store"] = {"uri": str(OUT / "unused-store")}
    raw["scaling"]["use_gpu"] = args.device.startswith("cuda")
    if args.precision == "fp32":
        raw["scaling"]["mixed_precision"] = False
    if args.batch_size is not None:  # 0 or less is refused by PretrainConfig, not ignored
        raw["batch_size"] = args.batch_size
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
    device = torch.device(args.device)
    # Ray Train's prepare_model moves the student in the job; here the wrap does it
    learner = Learner(cfg, device, wrap=lambda m: m.to(device))
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
    crop_rates = []  # the step's first stage alone, on the same device
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            multi_crop(torch.from_numpy(batch()).to(device), cfg.crops, gen)
        if device.type == "cuda":
            torch.cuda.synchronize()
        crop_rates.append(args.steps * b / (time.perf_counter() - start))
    crop_med = statistics.median(crop_rates)
    amp = "bfloat16 autocast" if learner.amp else "float32"
    print(
        f"\nDINO step, {args.config.stem} ({cfg.encoder.timm_name} {cfg.encoder.kwargs}), "
        f"batch {b} tiles of {cfg.stream.tiling.tile_px} px, {cfg.crops.n_crops} crops, "
        f"{args.device} ({device_name(args.device)}), {amp}, {args.threads} threads"
    )
    print(
        f"  {med:.1f} tiles/s (median of {args.repeats} x {args.steps} steps; all: "
        f"{[round(x, 1) for x in rates]})"
    )
    print(
        f"  multi-crop alone ({args.device}): {crop_med:.1f} tiles/s, "
        f"{med / crop_med:.0%} of the step's time"
    )
    OUT.mkdir(parents=True, exist_ok=True)
    name = f"pretrain_throughput-{args.config.stem}-{args.device}-{args.precision}-t{args.threads}"
    out = OUT / f"{name}.json"
    record = {
        "command": command,
        "device": device_name(args.device),
        "autocast_bf16": learner.amp,
        "batch_size": b,
        "tiles_per_s": rates,
        "median": med,
        "crop_tiles_per_s": crop_rates,
        "crop_median": crop_med,
    }
    out.write_text(json.dumps(record))
    print(f"\nreproduce: {command}\nwrote {out}")
    return 0


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({torch.get_num_threads()} torch threads)"


if __name__ == "__main__":
    raise SystemExit(main())
