"""Does the classifier's operating point travel to centers it never saw?

The classifier's threshold was chosen on validation slides for a target sensitivity (0.90).
At an external center the scores move, so the platform carries the operating point to each
center through the unlabelled scores of the slides screened there (screening.threshold). The
acceptance: at the platform's threshold, sensitivity stays within 0.10 of the target and
specificity at least 0.70, on the demo's external centers and on fresh external profiles
(bench/fresh_centers.yaml) that were written once, a priori, and never tuned on their slides.

1. generates the fresh centers' tiny SYNTHETIC slides once (the study's abnormal density),
   cuts them into batches and uploads them into the arm's store (a re-run reuses both);
2. screens them with the arm's classifier and screening settings, batch k of every center
   before batch k+1, skipping batches already screened, so each center's threshold builds up
   batch by batch as in production;
3. sensitivity and specificity at the stored threshold and at the platform's (the rows'
   ``positive``), per center and pooled, against the manifests' grades.

    .venv/bin/python bench/threshold_travel.py --arm pa
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from smartccs import layout
from smartccs.batches import load_batch
from smartccs.engine.config import ScreeningConfig
from smartccs.engine.screen import screen_batches
from smartccs.logs import configure_logging
from smartccs.metrics.classification import roc_auc
from smartccs.models.artifacts import load_card
from smartccs.results.tables import list_partitions, read_commit, read_table
from smartccs.store import Store, StoreConfig
from smartccs.study.cohort import StudyBatch, cut_batches, ensure_uploaded
from smartccs.study.config import StudyConfig
from smartccs.study.run import StudyState
from smartccs.synth.profiles import abnormal_density_tag, load_profiles

log = logging.getLogger("bench.threshold_travel")
SLACK, MIN_SPEC = 0.10, 0.70


def newest_study(store: Store) -> str:
    """The study under ``runs/`` whose arms were written last (a local store only)."""
    if store.protocol != "file":
        raise SystemExit("--study is required for a remote store")
    arms = [p for p in Path(store.path("runs")).glob("*/arms") if p.is_dir()]
    if not arms:
        raise SystemExit(f"no study with screened arms under {store.uri('runs')}")
    return max(arms, key=lambda p: p.stat().st_mtime).parent.name


def fresh_batches(store: Store, args: argparse.Namespace, scale: float) -> list[StudyBatch]:
    """The fresh centers' slides, generated once under ``--out`` and uploaded as batches of
    ``--batch-slides`` into ``store`` (a re-run reuses both)."""
    from smartccs.synth.cohort import generate_cohort

    dense = abnormal_density_tag(scale)
    cohort = (
        Path(args.out) / "cohort" / f"{Path(args.profiles).stem}-n{args.slides}-s{args.seed}{dense}"
    )
    if not (cohort / "cohort.json").is_file():
        names = [p.name for p in load_profiles(args.profiles)]
        log.info("generating %d SYNTHETIC slides for each of %s in %s", args.slides, names, cohort)
        generate_cohort(cohort, center_names=names, slides_per_center=args.slides, size="tiny",
                        seed=args.seed, profiles=args.profiles, progress=False,
                        abnormal_density_scale=scale)  # fmt: skip
    tag = f"fresh-n{args.slides}-s{args.seed}{dense}-b{args.batch_slides}"
    cut = cut_batches(cohort, cohort / "batches", tag, 0.5, args.batch_slides, args.seed)
    if any(b.kind != "external" for _, b in cut):
        raise SystemExit(f"{args.profiles}: every fresh center must be kind: external")
    for folder, b in cut:
        ensure_uploaded(store, folder, b.center, b.batch)
    log.info("fresh batches in %s: %s", store.uri(), ", ".join(b.id for _, b in cut))
    return [b for _, b in cut]


def screen_in_order(
    store: Store, batches: list[StudyBatch], cfg: ScreeningConfig, run_id: str, address: str | None
) -> None:
    """Screen batch k of every center before batch k+1; batches with results are kept."""
    from smartccs.raycluster import init_ray

    mine = {(b.center, b.batch) for b in batches}
    centers = {c for c, _ in mine}
    others = [f"{c}/{b}" for c, b in list_partitions(store) if c in centers and (c, b) not in mine]
    if others:
        log.warning("the fresh centers also hold %s: their scores feed those centers' thresholds "
                    "too (use another --out to keep runs apart)", others)  # fmt: skip
    for k in sorted({int(b.batch.rsplit("test", 1)[1]) for b in batches}):
        todo = [b for b in batches if b.batch.endswith(f"-test{k}")]
        done = [b.id for b in todo if read_commit(store, b.center, b.batch) is not None]
        if done:
            log.info("already screened, kept: %s", ", ".join(done))
        todo = [b for b in todo if b.id not in done]
        if todo:
            init_ray(address)
            refs = [load_batch(store, b.center, b.batch) for b in todo]
            screen_batches(store, refs, cfg, run_id=run_id)


def labelled_rows(store: Store, batches: list[StudyBatch], classifier: str) -> list[dict[str, Any]]:
    """The arm's slide rows of these batches with ``abnormal`` (manifest grade != NILM)."""
    refs = [load_batch(store, b.center, b.batch) for b in batches]
    truth = {
        (r.center, r.batch, s.slide_id): s.grade != "NILM" for r in refs for s in r.manifest.slides
    }
    table = read_table(
        store, "slides", centers={b.center for b in batches}, batches={b.batch for b in batches}
    )
    rows = [r | {"abnormal": truth[k]} for r in table.to_pylist()
            if (k := (r["center"], r["batch"], r["slide_id"])) in truth]  # fmt: skip
    other = [r["slide_id"] for r in rows if r["classifier"] != classifier]
    if other:
        log.warning(
            "%d rows screened by another classifier than %s, left out", len(other), classifier
        )
    unscored = [r["slide_id"] for r in rows if r["score"] is None]
    if unscored:
        log.warning("%d slides without a score (failed or rejected), left out: %s", len(unscored),
                    unscored)  # fmt: skip
    return [r for r in rows if r["classifier"] == classifier and r["score"] is not None]


def _rates(pred: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    sens = float((pred & y).sum() / y.sum()) if y.any() else math.nan
    spec = float((~pred & ~y).sum() / (~y).sum()) if (~y).any() else math.nan
    return sens, spec


def summarize(name: str, kind: str, rows: list[dict[str, Any]], stored: float) -> dict[str, Any]:
    """Sensitivity and specificity at the stored threshold and at the platform's (``positive``)."""
    y = np.array([r["abnormal"] for r in rows], dtype=bool)
    scores = np.array([r["score"] for r in rows], dtype=np.float64)
    platform = np.array([bool(r["positive"]) for r in rows], dtype=bool)
    thr = [float(r["threshold"]) for r in rows] or [math.nan]
    carried = sum(r["threshold_source"] == "center" for r in rows)
    auc = roc_auc(y, scores) if y.any() and not y.all() else math.nan
    return dict(center=name, kind=kind, slides=len(rows), abnormal=int(y.sum()), auc=auc,
                stored=_rates(scores >= stored, y), platform=_rates(platform, y),
                threshold=(min(thr), max(thr)), carried=carried)  # fmt: skip


def holds(row: dict[str, Any], target: float) -> bool:
    sens, spec = row["platform"]
    return abs(sens - target) <= SLACK + 1e-9 and spec >= MIN_SPEC - 1e-9


def markdown(rows: list[dict[str, Any]], target: float) -> str:
    head = [
        "center",
        "kind",
        "slides",
        "abnormal",
        "AUC",
        "sens @stored",
        "spec @stored",
        "platform threshold",
        "carried",
        "sens @platform",
        "spec @platform",
        "holds",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        lo, hi = r["threshold"]
        thr = f"{lo:.3f}" if hi - lo < 5e-4 else f"{lo:.3f}-{hi:.3f}"
        ok = "yes" if holds(r, target) else "NO"
        cells = [r["center"], r["kind"], r["slides"], r["abnormal"], f"{r['auc']:.2f}",
                 *(f"{v:.2f}" for v in r["stored"]), thr, f"{r['carried']}/{r['slides']}",
                 *(f"{v:.2f}" for v in r["platform"]), ok]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def arm_setup(
    args: argparse.Namespace,
) -> tuple[StudyConfig, StudyState, str, Store, ScreeningConfig]:
    """The study's config and state, the arm's store and the arm's screening settings."""
    raw = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    cfg = StudyConfig.model_validate(
        raw | {"store": StoreConfig.from_env(args.store).model_dump(mode="json")}
    )
    root = Store(cfg.store)
    study = args.study or newest_study(root)
    if cfg.study_id() != study:
        log.warning("study %s does not match %s (id %s): the arm's screening settings "
                    "below come from that config", study, args.config or "the defaults",
                    cfg.study_id())  # fmt: skip
    state = StudyState.model_validate_json(root.read_bytes(f"{layout.run(study)}/state.json"))
    if args.arm not in state.screened:
        raise SystemExit(f"study {study} has not screened arm {args.arm} yet")
    arm = next(a for a in cfg.arms if a.name == args.arm)
    uri = f"{cfg.store.uri.rstrip('/')}/{layout.run(study)}/arms/{arm.name}"  # run._Study.arm_store
    name, version = f"classifier-{arm.init}", state.classifiers[arm.init]
    # the arm's screening settings, as run._screen builds them
    arm_fields = {"classifier_model": name, "classifier_version": version,
                  "adapt": {"method": arm.adapt}}  # fmt: skip
    screening = ScreeningConfig.model_validate(cfg.settings()["screening"] | arm_fields)
    return cfg, state, study, Store(StoreConfig(uri=uri, s3=cfg.store.s3)), screening


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default=None, help="study store (default $CCS_STORE, ./ccs-data)")
    p.add_argument("--study", default=None, help="study id (default: the newest with arms)")
    p.add_argument("--config", default=None, help="the study's StudyConfig YAML if not default")
    p.add_argument("--arm", default="pa", choices=("base", "p", "pa"))
    p.add_argument("--slides", type=int, default=12, help="slides per fresh center")
    p.add_argument("--batch-slides", type=int, default=6)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--profiles", default="bench/fresh_centers.yaml")
    p.add_argument("--out", default="bench/out/threshold_travel")
    p.add_argument("--address", default=None, help="Ray address (default: a local Ray)")
    args = p.parse_args()
    configure_logging(1)
    log.setLevel(logging.INFO)

    cfg, state, study, store, screening = arm_setup(args)
    classifier = f"{screening.classifier_model}/{screening.classifier_version}"
    head = load_card(store, screening.classifier_model, screening.classifier_version).head
    stored, op = float(head["threshold"]), head.get("operating_point") or {}
    target = float(op.get("target_sensitivity", 0.90))
    log.info("study %s arm %s: %s, stored threshold %.4f for sensitivity %.2f, score reference "
             "%s, adaptation %s, threshold %s", study, args.arm, classifier, stored, target,
             "present" if op.get("reference") else "ABSENT (carrying falls back to the stored one)",
             screening.adapt.method, screening.threshold.model_dump())  # fmt: skip

    fresh = fresh_batches(store, args, cfg.abnormal_density_scale)
    screen_in_order(store, fresh, screening, f"{study}-{args.arm}-fresh", args.address)

    demo = [b for b in state.batches if b.kind == "external" and b.role == "test"]
    table: list[dict[str, Any]] = []
    pooled: dict[str, list[dict[str, Any]]] = {}
    for kind, batches in {"demo external": demo, "fresh": fresh}.items():
        pooled[kind] = rows = labelled_rows(store, batches, classifier)
        for c in sorted({r["center"] for r in rows}):
            table.append(summarize(c, kind, [r for r in rows if r["center"] == c], stored))
    pooled["all external"] = pooled["demo external"] + pooled["fresh"]
    table += [summarize(f"pooled {k}", "pooled", rows, stored) for k, rows in pooled.items()]

    centers = [r for r in table if r["kind"] != "pooled"]
    pooled_verdicts = [f"{r['center']} {'holds' if holds(r, target) else 'FAILS'}"
                       for r in table if r["kind"] == "pooled"]  # fmt: skip
    verdict = (
        f"acceptance (|sens - {target:.2f}| <= {SLACK:.2f} and spec >= {MIN_SPEC:.2f} at the "
        f"platform threshold): {sum(holds(r, target) for r in centers)}/{len(centers)} centers "
        f"hold; {'; '.join(pooled_verdicts)}"
    )
    title = (
        f"study {study}, arm {args.arm} ({classifier}), stored threshold {stored:.4f}, "
        f"target sensitivity {target:.2f}; SYNTHETIC slides"
    )
    md = f"{title}\n\n{markdown(table, target)}\n\n{verdict}\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{study}-{args.arm}.md").write_text(md)
    for r in table:
        r["holds"] = holds(r, target)
    report = {"title": title, "classifier": classifier, "stored_threshold": stored,
              "target_sensitivity": target, "threshold": screening.threshold.model_dump(),
              "rows": table, "verdict": verdict}  # fmt: skip
    (out / f"{study}-{args.arm}.json").write_text(json.dumps(report, indent=2))
    print(f"\n{md}\nwritten: {out / f'{study}-{args.arm}.md'}")


if __name__ == "__main__":
    main()
