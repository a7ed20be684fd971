"""A scorer actor's start before its first tile: its detector and cell encoder, loaded.

For the demo and the production model sizes (``bench/screening.py``'s DEMO and PROD, random
weights, saved once in a local store), in this one process after its imports, ``--threads``
torch threads (a scorer actor runs with its CPUs' worth), medians of ``--repeats``:

- read: both models' weights from the store, sha256 checked, safetensors parsed;
- build, ordinary: each network built with random weights, then its state dict copied in;
- build, meta: ``models.materialize.with_weights``, what the scorer does: built on the meta
  device, the state dict's tensors put in place;
- ``CellScorer(...)``: the whole constructor as a scorer actor runs it (read and build).

    python bench/scorer_start.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch
from screening import OUT, demo_models

from smartccs.models.artifacts import load_card, load_model
from smartccs.models.detector import build_detector
from smartccs.models.encoder import build_from
from smartccs.models.materialize import with_weights
from smartccs.models.refs import ModelRef
from smartccs.screening.cells import CellConfig, CellScorer
from smartccs.store import Store, StoreConfig


def timed(fn: Callable[[], object]) -> dict[str, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall}


def ordinary(build: Callable[[], torch.nn.Module], state: dict) -> torch.nn.Module:
    model = build()
    model.load_state_dict(state, strict=True)
    return model


def measure(store: Store, spec: str, repeats: int, threads: int) -> dict:
    cls = load_card(store, demo_models(store, spec).name)
    det, enc = ModelRef(**cls.head["detector"]), ModelRef(**cls.head["encoder"])
    det_card, det_state = load_model(store, det.name, det.version)
    enc_card, enc_state = load_model(store, enc.name, enc.version)
    builds = {
        "detector": lambda: build_detector(det_card),
        "encoder": lambda: build_from(enc_card.architecture),
    }
    states = {"detector": det_state, "encoder": enc_state}
    torch.set_num_threads(threads)
    runs: dict[str, list[dict[str, float]]] = {}

    def add(name: str, fn: Callable[[], object]) -> None:
        runs.setdefault(name, []).append(timed(fn))

    for _ in range(repeats):
        add("read", lambda: [load_model(store, r.name, r.version) for r in (det, enc)])
        for how, load in (("ordinary", ordinary), ("meta", with_weights)):
            copies = {k: {n: t.clone() for n, t in v.items()} for k, v in states.items()}
            add(f"build_{how}", lambda load=load, c=copies: [load(builds[k], c[k]) for k in c])
        add(
            "cell_scorer",
            lambda: CellScorer(
                store.config, det, CellConfig(**cls.head["cells"]), threads, encoder=enc
            ),
        )
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    params = sum(t.numel() for s in states.values() for t in s.values())
    return {"parameters": params, "runs": runs, "median": med}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sizes", nargs="+", default=["demo", "prod"], choices=["demo", "prod"])
    ap.add_argument("--tag", default="cpu")
    args = ap.parse_args(argv)
    command = "python bench/scorer_start.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    store = Store(StoreConfig(uri=str(OUT / "screening" / "store")))
    result = {"command": command, "threads": args.threads, "sizes": {}}
    for spec in args.sizes:
        print(f"{spec} sizes ...", flush=True)
        r = result["sizes"][spec] = measure(store, spec, args.repeats, args.threads)
        med = r["median"]
        print(f"  {r['parameters'] / 1e6:.0f} M parameters (detector + encoder)")
        for k, v in med.items():
            print(f"  {k:16s} {v['cpu_s']:7.2f} CPU-s {v['wall_s']:7.2f} s wall")
        ratio = med["build_meta"]["cpu_s"] / max(med["build_ordinary"]["cpu_s"], 1e-9)
        r["build_meta_vs_ordinary_cpu"] = ratio
        print(f"  build, meta / ordinary: {ratio:.2f} of the CPU")
    out = OUT / f"scorer_start-{args.tag}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"\nreproduce: {command}\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
