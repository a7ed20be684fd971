"""The adaptive screening service under load, beside the batch job on the same cohort.

One run measures, on ``--centers`` centers each with one committed batch (the same
``--slides`` synthetic slides uploaded under every center, ``--adapt`` smartccs by default):

1. the batch job: ``run_screen_job`` over every batch (a fresh store), wall time and slides/s;
2. the service (``serve/config.yaml``'s application on the same Ray, a second fresh store
   with the same content): every center submits its batch at the same moment over HTTP
   (one thread per center): **admission latency** per POST (p50, p99, max), then wall time
   from the first POST until every batch is done, and slides/s;
3. admission alone: every center re-submits ``--resubmits`` times at once (already known
   batches: 200, nothing queued), p50/p99 of that path under concurrency.

The models are the demo sizes with random weights (``bench/screening.py``'s), or trained ones
with ``--models``. Medians over nothing: one run is one measurement of each figure, all taken
on the same machine in the same run.

    python bench/service.py                             # 8 centers, 2 slides of 3000 px each
    python bench/service.py --centers 16 --tag cpu2-16c
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from load import latency_ms
from screening import OUT, copy_models, demo_models
from service_setup import BATCH, bench_cohort, screening_config, serve_app, upload_cohort

from smartccs.adaptation.config import METHODS
from smartccs.engine.job import ScreenJobConfig, run_screen_job
from smartccs.raycluster import init_ray
from smartccs.service.auth import new_token
from smartccs.service.client import absolute
from smartccs.service.records import FINAL_STATES
from smartccs.store import Store


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--centers", type=int, default=8)
    ap.add_argument("--slides", type=int, default=2, help="slides per batch")
    ap.add_argument("--side-px", type=int, default=3000)
    ap.add_argument("--adapt", default="smartccs", choices=METHODS)
    ap.add_argument("--resubmits", type=int, default=4)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--models", default=None, help="store URI with a trained classifier")
    ap.add_argument("--tag", default=None)
    args = ap.parse_args(argv)
    command = "python bench/service.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    folder, centers = bench_cohort(args.cpus, args.slides, args.side_px, args.centers)
    work = Path(tempfile.mkdtemp(prefix="service-", dir=OUT))
    stores = {k: Store(str(work / k)) for k in ("job", "service")}
    for store in stores.values():
        upload_cohort(store, folder, centers)
    refs = {
        k: (copy_models(s, args.models) if args.models else demo_models(s))
        for k, s in stores.items()
    }
    screening = screening_config(refs["job"])
    init_ray(num_cpus=2 * args.cpus)  # logical: actors and tasks coexist, as in the tests
    n_slides = args.centers * args.slides

    t0 = time.perf_counter()
    run_screen_job(
        ScreenJobConfig(store=stores["job"].config, adapt=args.adapt, screening=screening)
    )
    job_wall = time.perf_counter() - t0

    tokens = {c: new_token() for c in centers}
    service = screening_config(refs["service"])
    with serve_app(stores["service"], service, args.adapt, tokens) as base:
        url = f"{base}/v1/batches"

        def post(center: str) -> tuple[float, dict]:
            t = time.perf_counter()
            r = requests.post(
                url,
                json={"center": center, "batch": BATCH},
                headers={"Authorization": f"Bearer {tokens[center][0]}"},
                timeout=120,
            )
            r.raise_for_status()
            return time.perf_counter() - t, r.json()

        with ThreadPoolExecutor(max_workers=len(centers)) as pool:
            t0 = time.perf_counter()
            first = list(pool.map(post, centers))
            pending = {
                c: absolute(base, body["status_url"])
                for c, (_, body) in zip(centers, first, strict=True)
            }
            while pending:
                for c, status_url in list(pending.items()):
                    auth = {"Authorization": f"Bearer {tokens[c][0]}"}
                    state = requests.get(status_url, headers=auth, timeout=60).json()["state"]
                    if state in FINAL_STATES:
                        if state == "failed":
                            raise SystemExit(f"service batch of {c} failed")
                        pending.pop(c)
                time.sleep(0.5)
            service_wall = time.perf_counter() - t0
            again = list(pool.map(post, centers * args.resubmits))

    result = {
        "command": command,
        "centers": args.centers,
        "slides": n_slides,
        "slide_px": args.side_px,
        "adapt": args.adapt,
        "cpus": args.cpus,
        "batch_job": {"wall_s": round(job_wall, 2), "slides_per_s": round(n_slides / job_wall, 3)},
        "service": {
            "wall_s": round(service_wall, 2),
            "slides_per_s": round(n_slides / service_wall, 3),
            "admission": latency_ms([t for t, _ in first]),
            "readmission": latency_ms([t for t, _ in again]),
        },
    }
    result["service_vs_job"] = round(result["service"]["slides_per_s"] / (n_slides / job_wall), 3)
    out = OUT / f"service-{args.tag or 'latest'}.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
