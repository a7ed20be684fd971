"""Does test-time adaptation help? Slide AUC with and without it, per center kind.

1. Generates (once) a graded SYNTHETIC cohort of tiny slides for internal centers (the
   profiles the models were trained on, new slides) and external ones (profiles that shift
   pixel size, format, compression, hue, stain strength and focus), and splits each center's
   slides into ``--batches`` batches, so adaptation is carried from batch to batch.
2. For each method (none, smartccs, tent) copies the trained models into a fresh store,
   uploads the batches and runs the batch screening job with ``--adapt <method>``.
3. AUC of the slide score (1 - P(NILM)) against the manifests' grades, per center and pooled
   over internal and over external centers; the differences to ``none``.

    python research/adaptation_study.py --models bench/out/training-study/store-cohort-small-6-seed0
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import yaml
from study_helpers import OUT, REPO

from smartccs.adaptation.config import METHODS, AdaptConfig
from smartccs.data.tiles import StreamConfig
from smartccs.engine.config import ScorerPool, ScreeningConfig
from smartccs.engine.job import ScreenJobConfig, run_screen_job
from smartccs.evaluation.truth import slide_truth
from smartccs.logs import configure_logging
from smartccs.manifest import Manifest
from smartccs.metrics.classification import (
    bootstrap_auc_diff_ci,
    roc_auc,
    within_group_auc_diff,
)
from smartccs.raycluster import init_ray
from smartccs.results.tables import read_table
from smartccs.screening.adequacy import AdequacyConfig
from smartccs.store import Store
from smartccs.study.cohort import generated_centers
from smartccs.synth.cohort import generate_cohort
from smartccs.synth.profiles import abnormal_density_tag, load_profiles
from smartccs.upload import upload_batch

sys.path.insert(0, str(REPO / "bench"))  # bench/screening.py copies a study store's models
from screening import copy_models


def split_batches(center_dir: Path, n: int, out: Path) -> list[Path]:
    """The center's slides as ``n`` batch folders (symlinks and a manifest each)."""
    manifest = Manifest.loads((center_dir / "manifest.json").read_bytes())
    folders = []
    for i in range(n):
        part = manifest.slides[i::n]
        folder = out / center_dir.name / f"b{i + 1}"
        if not (folder / "manifest.json").exists():
            folder.mkdir(parents=True, exist_ok=True)
            for s in part:
                link = folder / s.path
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.exists():
                    link.symlink_to((center_dir / s.path).resolve())
            sub = manifest.model_copy(update={"batch": f"b{i + 1}", "slides": part})
            (folder / "manifest.json").write_text(sub.model_dump_json(indent=2))
        folders.append(folder)
    return folders


def auc_of(rows: list[dict], truth: dict[tuple[str, str, str], str]) -> float | None:
    pairs = [
        (truth[(r["center"], r["batch"], r["slide_id"])] != "NILM", r["score"])
        for r in rows
        if r["score"] is not None
    ]
    ys = [y for y, _ in pairs]
    if not any(ys) or all(ys):
        return None
    return roc_auc(ys, [s for _, s in pairs])


def paired_gain(
    base: dict[tuple, float], other: dict[tuple, float], truth: dict[tuple, str], centers: set
) -> dict[str, float] | None:
    """AUC(other) - AUC(base) on the slides both scored, with its paired bootstrap 95% CI."""
    keys = sorted(k for k in base.keys() & other.keys() if k[0] in centers)
    y = [truth[k] != "NILM" for k in keys]
    if not any(y) or all(y):
        return None
    a, b = [base[k] for k in keys], [other[k] for k in keys]
    lo, hi = bootstrap_auc_diff_ci(y, a, b)
    return {"gain": round(roc_auc(y, b) - roc_auc(y, a), 4), "ci95": [round(lo, 4), round(hi, 4)],
            "slides": len(keys)}  # fmt: skip


def within_center_gain(
    base: dict[tuple, float], other: dict[tuple, float], truth: dict[tuple, str], centers: set
) -> dict[str, float] | None:
    """Mean over these centers of the AUC gain inside each, with its paired bootstrap 95% CI."""
    keys = sorted(k for k in base.keys() & other.keys() if k[0] in centers)
    if not keys:
        return None
    y = [truth[k] != "NILM" for k in keys]
    groups = [k[0] for k in keys]
    gain, lo, hi = within_group_auc_diff(
        groups, y, [base[k] for k in keys], [other[k] for k in keys]
    )
    return {"gain": round(gain, 4), "ci95": [round(lo, 4), round(hi, 4)], "slides": len(keys)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", required=True, help="store URI with the trained classifier")
    ap.add_argument("--internal", default="int-a,int-b")
    ap.add_argument("--external", default="ext-a,ext-b,ext-c")
    ap.add_argument("--slides-per-center", type=int, default=24)
    ap.add_argument("--batches", type=int, default=3, help="batches per center")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument(
        "--adapt-config",
        type=Path,
        default=None,
        help="YAML of AdaptConfig settings (smartccs, tent, max_drift, ...); tune them on a "
        "cohort seed other than the one reported",
    )
    ap.add_argument(
        "--abnormal-density",
        type=float,
        default=1.0,
        help="abnormal cells per abnormal slide, times the profiles' (10: a tiny slide carries "
        "a small one's 20-100; use the classifier's training cohort's setting)",
    )
    ap.add_argument("--tag", default=None)
    args = ap.parse_args(argv)
    command = "python research/adaptation_study.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    configure_logging(1)
    internal, external = args.internal.split(","), args.external.split(",")
    kinds = {p.name: p.kind for p in load_profiles(None)}
    assert all(kinds[c] == "internal" for c in internal), "internal centers only"
    assert all(kinds[c] == "external" for c in external), "external centers only"
    dense = abnormal_density_tag(args.abnormal_density)
    cohort = OUT / f"adapt-cohort-{args.slides_per_center}-seed{args.seed}{dense}"
    if not (cohort / "cohort.json").is_file():
        generate_cohort(
            cohort,
            center_names=internal + external,
            slides_per_center=args.slides_per_center,
            size="tiny",
            seed=args.seed,
            abnormal_density_scale=args.abnormal_density,
        )
    batch_dirs = {
        d.name: split_batches(d, args.batches, cohort / "batches")
        for d in generated_centers(cohort)
    }
    init_ray()
    work = Path(tempfile.mkdtemp(prefix="adapt-study-", dir=OUT))
    screening = ScreeningConfig(
        stream=StreamConfig(readers=1, reader_cpus=0.5, planner_cpus=0.25),
        scorers=ScorerPool(actors=1, cpus=1.0),
        adequacy=AdequacyConfig(min_squamous=0),  # tiny slides: score every one
        adapt=AdaptConfig.model_validate(
            yaml.safe_load(args.adapt_config.read_text()) if args.adapt_config else {}
        ),
    )
    results: dict[str, dict] = {}
    scores: dict[str, dict[tuple, float]] = {}
    truth: dict[tuple, str] = {}
    for method in args.methods.split(","):
        store = Store(str(work / method))
        ref = copy_models(store, args.models)
        batches = []
        for center, folders in batch_dirs.items():
            for folder in folders:
                upload_batch(folder, center=center, batch=folder.name, store=store, progress=False)
                batches.append(f"{center}/{folder.name}")
        t0 = time.perf_counter()
        run_screen_job(
            ScreenJobConfig(
                store=store.config, batches=batches, model=f"{ref.name}/{ref.version}",
                adapt=method, run_id=method, screening=screening,
            )
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        rows = read_table(store, "slides").to_pylist()
        truth = {
            (t["center"], t["batch"], t["slide_id"]): t["grade"]
            for t in slide_truth(store, [tuple(b.split("/")) for b in batches]).to_pylist()
        }
        scores[method] = {
            (r["center"], r["batch"], r["slide_id"]): r["score"]
            for r in rows
            if r["score"] is not None
        }
        per_center = {c: auc_of([r for r in rows if r["center"] == c], truth) for c in batch_dirs}
        results[method] = {
            "internal": auc_of([r for r in rows if r["center"] in internal], truth),
            "external": auc_of([r for r in rows if r["center"] in external], truth),
            "per_center": per_center,
            "seconds": round(seconds, 1),
        }
        print(method, json.dumps(results[method]), flush=True)
    base = results.get("none")
    summary = {
        "command": command,
        "models": args.models,
        "cohort": str(cohort),
        "adapt": screening.adapt.model_dump(),
        "results": results,
    }
    if base:
        # pooled, and per center: a pooled gain can come from moving centers' score levels
        # apart rather than ranking better inside any of them
        kinds = {"internal": set(internal), "external": set(external)}
        kinds |= {c: {c} for c in internal + external}
        summary["vs_none"] = {
            m: {k: paired_gain(scores["none"], scores[m], truth, c) for k, c in kinds.items()}
            | {
                f"{k}_within_centers": within_center_gain(scores["none"], scores[m], truth, c)
                for k, c in (("internal", set(internal)), ("external", set(external)))
            }
            for m in results
            if m != "none"
        }
    # every slide's score per method, for analyses this script does not make
    summary["slides"] = [
        {"center": k[0], "batch": k[1], "slide_id": k[2], "grade": g}
        | {m: scores[m].get(k) for m in scores}
        for k, g in sorted(truth.items())
    ]
    out = OUT / f"adaptation-study-{args.tag or 'latest'}.json"
    out.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary.get("vs_none", {}), indent=2))
    print(f"SYNTHETIC cohort; {command}\nwritten {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
