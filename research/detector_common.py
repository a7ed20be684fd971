"""Saved detectors of a training study, scored again on one common annotated test cohort.

In ``research/training_study.py`` each seed holds out its own 6 slides, so the pretrained and
random arms of a seed share a test set but seeds do not, and a split's few abnormal cells
(3-150 per class) decide much of the gap between arms. Here every detector of the study, both
arms of every seed, reads the same new slides of the same internal centers (a cohort seed the
study never drew, so none was trained on), several times as many abnormal cells as one split:
what is left between the arms is the training, not the choice of test slides.

    python research/detector_common.py --run-tag p1500-d300-i256-seed0-aa13a8-u4-t0.2

A detector already scored on the same cohort (an earlier output here) is not scored again.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from study_helpers import OUT, generated_batches
from training_study import print_arms

from smartccs.data.tiles import StreamConfig
from smartccs.logs import configure_logging
from smartccs.models.artifacts import list_versions, load_card
from smartccs.raycluster import init_ray
from smartccs.store import Store
from smartccs.train.detector import abnormal_ap_by_cells, abnormal_map, score_detector

STUDY = OUT / "training-study"  # where research/training_study.py writes
INITS = ("pretrained", "random")


def study_versions(
    store: Store, run_tags: dict[str, str], seeds: list[int]
) -> dict[str, dict[int, str]]:
    """``{init: {seed: version}}`` of the study's detectors, by the run name in their card (the
    last save of a run when it was resumed and saved again); each arm's runs by its own tag."""
    found: dict[str, dict[int, str]] = {init: {} for init in INITS}
    for init in INITS:
        run_tag = run_tags[init]
        wanted = {f"detector-{init}-{run_tag}-s{seed}": seed for seed in seeds}
        for version in list_versions(store, f"detector-{init}"):  # oldest first
            run = load_card(store, f"detector-{init}", version).training_config.get("run_name")
            if run in wanted:
                found[init][wanted[run]] = version
        missing = sorted(set(seeds) - set(found[init]))
        if missing:
            raise SystemExit(
                f"{store.uri()}: no detector-{init} of run detector-{init}-{run_tag}-s<seed> "
                f"for seeds {missing}; is --run-tag the study's detector tag?"
            )
    return found


def earlier_scores(cohort: Path, batches: list[str]) -> dict[str, dict]:
    """Rows of earlier runs on the same common cohort and batches, by detector version: a saved
    detector scored on the same slides gives the same figures, so it is not scored twice."""
    rows: dict[str, dict] = {}
    for path in sorted(STUDY.glob("*-common-seed*.json")):
        earlier = json.loads(path.read_text())
        if earlier["cohort"] == str(cohort) and earlier["batches"] == batches:
            for arm in earlier["results"].values():
                rows.update({row["version"]: row for row in arm})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--run-tag",
        required=True,
        help="the study's detector tag: its JSON name without the seeds suffix",
    )
    ap.add_argument(
        "--random-run-tag",
        default=None,
        help="the random arm from another study's runs (default: --run-tag); only where the "
        "two studies' detector configs, input normalization and seeds are the same, e.g. a "
        "new encoder with the old one's normalization pinned",
    )
    ap.add_argument("--store", type=Path, default=STUDY / "store-cohort-small-6-seed0")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--centers", default="int-a,int-b,int-c,int-d")
    ap.add_argument("--slides-per-center", type=int, default=6)
    ap.add_argument("--size", default="small")
    ap.add_argument(
        "--cohort-seed",
        type=int,
        default=30,
        help="not one the studies draw (0-9): slides no detector was trained on",
    )
    args = ap.parse_args(argv)
    command = "python research/detector_common.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    configure_logging(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    store = Store(str(args.store))
    tags = {"pretrained": args.run_tag, "random": args.random_run_tag or args.run_tag}
    versions = study_versions(store, tags, seeds)
    cohort = STUDY / f"common-test-{args.size}-{args.slides_per_center}-seed{args.cohort_seed}"
    batches = generated_batches(
        store, cohort, args.centers.split(","), args.slides_per_center, args.size,
        args.cohort_seed, f"common-test-seed{args.cohort_seed}",
    )  # fmt: skip
    done = earlier_scores(cohort, batches)
    init_ray()
    results: dict[str, list[dict]] = {init: [] for init in INITS}
    for seed in seeds:
        for init in INITS:
            t0 = time.perf_counter()
            version = versions[init][seed]
            if version in done:
                results[init].append(done[version] | {"seed": seed})
                print(f"seed {seed} {init} ({version}): scored before on this cohort")
                continue
            card = load_card(store, f"detector-{init}", version)
            stream = StreamConfig.model_validate(card.training_config["stream"])
            report = score_detector(store, f"detector-{init}", version, batches, stream)
            row = {
                "seed": seed,
                "version": version,
                "map50_abnormal": abnormal_map(report),
                "by_cells": abnormal_ap_by_cells(report.ap, report.n_gt),
                "ap50": report.ap,
                "n_gt": report.n_gt,
                "seconds": time.perf_counter() - t0,
            }
            results[init].append(row)
            print(f"seed {seed} {init} ({version}): abnormal mAP@0.5 {row['map50_abnormal']:.3f}, "
                  f"cell-weighted {row['by_cells']:.3f}", flush=True)  # fmt: skip
    summary = {"command": command, "cohort": str(cohort), "batches": batches, "results": results}
    name = f"{args.run_tag}-common-seed{args.cohort_seed}-s{''.join(map(str, seeds))}"
    if tags["random"] != tags["pretrained"]:
        name += f"-random-{tags['random']}"
    out = STUDY / f"{name}.json"
    out.write_text(json.dumps(summary, indent=2, default=float))
    n_gt = results["pretrained"][0]["n_gt"]
    print(f"\nSYNTHETIC cohorts; {command}\ncommon test cells: {n_gt}\n-> {out}")
    for key, title in (("map50_abnormal", "class-mean mAP@0.5"), ("by_cells", "cell-weighted AP")):
        print(title)
        print_arms(results, list(INITS), lambda x, key=key: x[key])
    return 0


if __name__ == "__main__":
    sys.exit(main())
