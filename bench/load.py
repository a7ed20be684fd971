"""The screening service under many centers at once: nothing lost, admission latency, throughput.

Every center fires its first submission and ``--resubmits`` copies of it at the same moment
(one HTTP client thread per request, released together), so the service sees concurrent
registrations of the same batch as well as of different ones. Then every batch is followed to
its end and its results read back. The run reports:

- admission latency of every POST (p50, p99, max) and the HTTP errors, if any, and the
  CPU-seconds each process spent while the POSTs were answered (the client is this process);
- throughput: slides per second from the first POST until the last batch is done;
- what was lost or doubled: a batch not done, a batch whose results lack a slide or repeat one,
  two centers given one batch id, a center's copies given different ids, or not exactly one of
  a center's copies registering the batch (``new``).

``run_load`` is what tests/test_faults_service.py runs (8 centers, tiny slides); ``main``
sets up the bigger run on a local Ray and Serve:

    python bench/load.py --centers 48 --slides 1 --side-px 1000 --resubmits 3 --repeats 3

``--repeats N`` bursts N times against the same service, each burst a fresh batch per center
once the previous burst's batches are done (so the first burst meets a cold service and the
others a warm one); the admission figures are the medians of the bursts'.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests
from monitor import cpu_spent, cpu_times

from smartccs.adaptation.config import METHODS
from smartccs.service.records import FINAL_STATES


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def latency_ms(values: list[float]) -> dict[str, float]:
    """p50, p99 and max of ``values`` (seconds), in milliseconds."""
    if not values:
        return {"n": 0}
    ms = [v * 1000 for v in values]
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 1),
        "p99_ms": round(_pct(ms, 0.99), 1),
        "max_ms": round(max(ms), 1),
    }


def run_load(
    base: str,
    batches: dict[str, tuple[str, str, list[str]]],
    resubmits: int = 3,
    timeout_s: float = 600.0,
    poll_s: float = 0.5,
    adapt: str | None = None,
    measure_cpu: bool = False,
) -> dict[str, Any]:
    """Submit every center's batch concurrently, ``1 + resubmits`` times each, follow them all
    to the end and read their results back.

    ``batches``: center -> (token, batch, the batch's slide ids); ``adapt``: the submissions'
    adaptation (None: the service's default). Returns the report (module docstring);
    ``report["lost"]`` and ``report["errors"]`` are empty when nothing went wrong. ``measure_cpu``:
    add the CPU-seconds each process spent while the POSTs were answered (the client's threads
    are this process, ``driver``).
    """
    extra = {"adapt": adapt} if adapt else {}
    jobs = [(c, i) for c in batches for i in range(1 + resubmits)]
    gate = threading.Barrier(len(jobs))

    def post(job: tuple[str, int]) -> tuple[str, float, int, dict | str]:
        center = job[0]
        token, batch, _ = batches[center]
        gate.wait()
        t = time.perf_counter()
        try:
            r = requests.post(
                f"{base}/v1/batches",
                json={"center": center, "batch": batch} | extra,
                headers={"Authorization": f"Bearer {token}"},
                timeout=120,
            )
        except requests.RequestException as exc:
            return center, time.perf_counter() - t, 0, f"{type(exc).__name__}: {exc}"
        body = r.json() if r.status_code in (200, 202) else r.text
        return center, time.perf_counter() - t, r.status_code, body

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        before = cpu_times() if measure_cpu else {}
        t0 = time.perf_counter()
        answers = list(pool.map(post, jobs))
        admitted_s = time.perf_counter() - t0
        after = cpu_times() if measure_cpu else {}
    errors = [f"{c}: HTTP {code} {body}" for c, _, code, body in answers if code not in (200, 202)]
    ids: dict[str, set[str]] = {c: set() for c in batches}
    new = Counter()
    for c, _, code, body in answers:
        if code in (200, 202):
            ids[c].add(body["batch_id"])
            new[c] += bool(body["new"])
    lost: list[str] = []
    owners = Counter(i for found in ids.values() for i in found)
    for c, found in ids.items():
        if len(found) != 1:
            lost.append(f"{c}: its {1 + resubmits} submissions got batch ids {sorted(found)}")
        if new[c] != 1:
            lost.append(f"{c}: {new[c]} of its submissions registered the batch, not one")
        lost += [f"{c}: batch id {i} also given to another center" for i in found if owners[i] > 1]

    pending = {c: next(iter(found)) for c, found in ids.items() if len(found) == 1}
    states: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        for c, bid in list(pending.items()):
            auth = {"Authorization": f"Bearer {batches[c][0]}"}
            try:
                status = requests.get(f"{base}/v1/batches/{bid}", headers=auth, timeout=60).json()
            except (requests.RequestException, ValueError) as exc:
                errors.append(f"{c}: status: {type(exc).__name__}: {exc}")
                continue
            if status.get("state") in FINAL_STATES:
                states[c] = status
                pending.pop(c)
        time.sleep(poll_s)
    wall = time.perf_counter() - t0
    lost += [f"{c}: not finished after {timeout_s:.0f} s" for c in pending]

    slides = 0
    for c, status in states.items():
        token, batch, expected = batches[c]
        slides += len(expected)
        if status["state"] != "done":
            lost.append(f"{c}: batch {batch} {status['state']}: {status.get('error')}")
            continue
        r = requests.get(
            f"{base}/v1/batches/{status['batch_id']}/results",
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        got = [row["slide_id"] for row in r.json()["slides"]] if r.status_code == 200 else []
        if sorted(got) != sorted(expected):
            lost.append(f"{c}: results hold slides {sorted(got)}, expected {sorted(expected)}")
    return {
        "centers": len(batches),
        "posts": len(jobs),
        "slides": slides,
        "admission": latency_ms([t for _, t, code, _ in answers if code in (200, 202)]),
        "admission_wall_s": round(admitted_s, 3),
        "admission_cpu_s_by_process": cpu_spent(before, after) if measure_cpu else None,
        "wall_s": round(wall, 2),
        "slides_per_s": round(slides / wall, 3) if wall else None,
        "attempts": dict(Counter(s.get("attempts") for s in states.values())),
        "errors": errors,
        "lost": lost,
    }


def main(argv: list[str] | None = None) -> int:
    """The bench: a fresh local store with ``--centers`` centers, the demo-size models with
    random weights, serve/config.yaml's application on a local Ray, then :func:`run_load`."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--centers", type=int, default=24)
    ap.add_argument("--slides", type=int, default=1, help="slides per batch")
    ap.add_argument("--side-px", type=int, default=2000)
    ap.add_argument("--resubmits", type=int, default=3)
    ap.add_argument("--adapt", default="smartccs", choices=METHODS)
    ap.add_argument("--workers", type=int, default=1, help="workers_per_replica")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="bursts, each of a fresh batch")
    ap.add_argument(
        "--haproxy",
        action="store_true",
        help="Serve's HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY=1) instead of its Python proxy",
    )
    ap.add_argument("--tag", default=None)
    args = ap.parse_args(argv)
    command = "python bench/load.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    idle_load = os.getloadavg()  # before this bench starts anything: was the machine quiet?

    from screening import OUT, demo_models
    from service_setup import bench_cohort, screening_config, serve_app, upload_cohort

    from smartccs.raycluster import init_ray
    from smartccs.service.auth import new_token
    from smartccs.store import Store

    folder, centers = bench_cohort(args.cpus, args.slides, args.side_px, args.centers)
    store = Store(tempfile.mkdtemp(prefix="load-", dir=OUT))
    tokens = {c: new_token() for c in centers}
    bursts = []  # one batch name per burst: each registers anew (the same slides)
    for b in (f"b{i + 1}" for i in range(args.repeats)):
        slide_ids = upload_cohort(store, folder, centers, b)  # the same slides for every center
        bursts.append({c: (tokens[c][0], b, slide_ids[c]) for c in centers})
    screening = screening_config(demo_models(store))
    if args.haproxy:  # read by Serve's controller and proxies: set before Ray starts them
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    init_ray(num_cpus=2 * args.cpus)

    runs, posts_load = [], []
    with serve_app(store, screening, args.adapt, tokens, workers_per_replica=args.workers) as base:
        for batches in bursts:  # the first meets a cold service; the others, a warm one
            posts_load.append(os.getloadavg())
            runs.append(run_load(base, batches, resubmits=args.resubmits, measure_cpu=True))
    report = {k: statistics.median(r["admission"][k] for r in runs) for k in runs[0]["admission"]}
    result = {
        "command": command,
        "cpus": args.cpus,
        "slide_px": args.side_px,
        "adapt": args.adapt,
        "workers_per_replica": args.workers,
        "ingress": "haproxy" if args.haproxy else "serve-proxy",
        "load_average_1_5_15min": {
            "start": [round(v, 2) for v in idle_load],
            "each_burst": [[round(v, 2) for v in loads] for loads in posts_load],
            "end": [round(v, 2) for v in os.getloadavg()],
        },
        "repeats": len(runs),
        "admission_median": report,
        "lost": [f"burst {i + 1}: {x}" for i, r in enumerate(runs) for x in r["lost"]],
        "errors": [f"burst {i + 1}: {x}" for i, r in enumerate(runs) for x in r["errors"]],
        "runs": runs,
    }
    out = OUT / f"load-{args.tag or 'latest'}.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"written {out}")
    return 1 if result["lost"] or result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
