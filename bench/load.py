"""The screening service under many centers at once: nothing lost, admission latency, throughput.

Every center fires its first submission and ``--resubmits`` copies of it at the same moment
(one HTTP client thread per request, released together), so the service sees concurrent
registrations of the same batch as well as of different ones. Then every batch is followed to
its end and its results read back. The run reports:

- admission latency of every POST (p50, p99, max) and the HTTP errors, if any;
- throughput: slides per second from the first POST until the last batch is done;
- what was lost or doubled: a batch not done, a batch whose results lack a slide or repeat one,
  two centers given one batch id, a center's copies given different ids, or not exactly one of
  a center's copies registering the batch (``new``).

``run_load`` is what tests/test_faults_service.py runs (8 centers, tiny slides); ``main``
sets up the bigger run on a local Ray and Serve:

    python bench/load.py --centers 24 --slides 1 --side-px 2000 --resubmits 3 --tag cpu2-24c
"""

from __future__ import annotations

import argparse
import json
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
) -> dict[str, Any]:
    """Submit every center's batch concurrently, ``1 + resubmits`` times each, follow them all
    to the end and read their results back.

    ``batches``: center -> (token, batch, the batch's slide ids); ``adapt``: the submissions'
    adaptation (None: the service's default). Returns the report (module docstring);
    ``report["lost"]`` and ``report["errors"]`` are empty when nothing went wrong.
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
        t0 = time.perf_counter()
        answers = list(pool.map(post, jobs))
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
    ap.add_argument("--tag", default=None)
    args = ap.parse_args(argv)
    command = "python bench/load.py " + shlex.join(argv if argv is not None else sys.argv[1:])

    from screening import OUT, demo_models
    from service_setup import BATCH, bench_cohort, screening_config, serve_app, upload_cohort

    from smartccs.raycluster import init_ray
    from smartccs.service.auth import new_token
    from smartccs.store import Store

    folder, centers = bench_cohort(args.cpus, args.slides, args.side_px, args.centers)
    store = Store(tempfile.mkdtemp(prefix="load-", dir=OUT))
    tokens = {c: new_token() for c in centers}
    slide_ids = upload_cohort(store, folder, centers)  # the same slides under every center
    batches = {c: (tokens[c][0], BATCH, slide_ids[c]) for c in centers}
    screening = screening_config(demo_models(store))
    init_ray(num_cpus=2 * args.cpus)

    with serve_app(store, screening, args.adapt, tokens, workers_per_replica=args.workers) as base:
        report = run_load(base, batches, resubmits=args.resubmits)
    result = {
        "command": command,
        "cpus": args.cpus,
        "slide_px": args.side_px,
        "adapt": args.adapt,
        "workers_per_replica": args.workers,
    } | report
    out = OUT / f"load-{args.tag or 'latest'}.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"written {out}")
    return 1 if report["lost"] or report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
