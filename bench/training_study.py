"""The three training jobs on synthetic cohorts, with the detector's pretraining ablation.

1. Generates (once) an annotated cohort of internal centers (``--size small``), uploads it with
   its cell labels to a local store and pretrains the encoder with
   jobs/configs/pretrain-demo.yaml for ``--pretrain-steps``.
2. Finetunes jobs/configs/detector-demo.yaml twice, ``init: pretrained`` and ``init: random``,
   with identical data, split, steps and seed: held-out AP@0.5 per class for both.
3. Trains jobs/configs/classifier-demo.yaml (on the pretrained detector) on a second, graded
   cohort of many tiny slides from the same centers: held-out AUC, sensitivity, specificity.

    python bench/training_study.py                     # about 25 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import yaml

from smartccs.demo import ensure_uploaded, generated_centers
from smartccs.logs import configure_logging
from smartccs.raycluster import init_ray
from smartccs.store import Store
from smartccs.synth.cohort import generate_cohort
from smartccs.train.classifier import ClassifierConfig, train_classifier
from smartccs.train.detector import DetectorConfig, abnormal_map, finetune_detector
from smartccs.train.pretrain import PretrainConfig, pretrain

OUT = Path(__file__).resolve().parent / "out"
CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


def _config(name: str, store: Store, **update) -> dict:
    raw = yaml.safe_load((CONFIGS / name).read_text())
    return raw | {"store": {"uri": store.config.uri}} | update


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--centers", default="int-a,int-b,int-c,int-d")
    ap.add_argument("--slides-per-center", type=int, default=6)
    ap.add_argument("--size", default="small")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--detector-steps", type=int, default=300)
    ap.add_argument("--classifier-slides", type=int, default=24, help="tiny slides per center")
    ap.add_argument("--out", type=Path, default=OUT / "training-study")
    args = ap.parse_args(argv)
    command = "python bench/training_study.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    configure_logging(1)
    cohort = args.out / f"cohort-{args.size}-{args.slides_per_center}-seed{args.seed}"
    if not (cohort / "cohort.json").is_file():
        generate_cohort(
            cohort,
            center_names=args.centers.split(","),
            slides_per_center=args.slides_per_center,
            size=args.size,
            seed=args.seed,
        )
    input_px = yaml.safe_load((CONFIGS / "detector-demo.yaml").read_text())["input_px"]
    tag = f"p{args.pretrain_steps}-d{args.detector_steps}-i{input_px}-seed{args.seed}"
    store = Store(str(args.out / f"store-{cohort.name}"))
    annotated = [f"{d.name}/{ensure_uploaded(store, d, d.name, 'bench').batch}" for d in
                 generated_centers(cohort)]  # fmt: skip
    init_ray()
    t0 = time.perf_counter()
    enc = pretrain(
        PretrainConfig.model_validate(
            _config(
                "pretrain-demo.yaml", store, run_name=f"pretrain-{tag}",
                max_steps=args.pretrain_steps, seed=args.seed, batches=annotated,
            )
        )
    )  # fmt: skip
    t_pretrain = time.perf_counter() - t0
    results = {}
    for init in ("pretrained", "random"):
        t0 = time.perf_counter()
        cfg = DetectorConfig.model_validate(
            _config(
                "detector-demo.yaml", store, run_name=f"detector-{init}-{tag}",
                model_name=f"detector-{init}", init=init, encoder_version=enc.version,
                max_steps=args.detector_steps, seed=args.seed, batches=annotated,
            )
        )  # fmt: skip
        r = finetune_detector(cfg)
        results[init] = {
            "map50_abnormal": abnormal_map(r.report),
            "ap50": r.report.ap,
            "n_gt": r.report.n_gt,
            "seconds": time.perf_counter() - t0,
        }
    graded = args.out / f"graded-tiny-{args.classifier_slides}-seed{args.seed + 1}"
    if not (graded / "cohort.json").is_file():
        generate_cohort(
            graded,
            center_names=args.centers.split(","),
            slides_per_center=args.classifier_slides,
            size="tiny",
            seed=args.seed + 1,
        )
    graded_batches = [
        f"{d.name}/{ensure_uploaded(store, d, d.name, 'graded').batch}"
        for d in generated_centers(graded)
    ]
    t0 = time.perf_counter()
    cls = train_classifier(
        ClassifierConfig.model_validate(
            _config(
                "classifier-demo.yaml", store, run_name=f"classifier-{tag}",
                batches=graded_batches, detector_model="detector-pretrained", seed=args.seed,
            )
        )
    )  # fmt: skip
    results["classifier"] = cls.test.model_dump() | {"seconds": time.perf_counter() - t0}
    summary = {
        "command": command,
        "cohort": str(cohort),
        "encoder": enc.version,
        "pretrain_seconds": t_pretrain,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{tag}.json").write_text(json.dumps(summary, indent=2, default=float))
    classes = list(results["pretrained"]["ap50"])
    print(f"\nSYNTHETIC cohorts; {command}\nheld-out AP@0.5 on {cohort.name}")
    print(f"{'init':<11} {'mAP abn':>8} " + " ".join(f"{c:>8}" for c in classes))
    for init in ("pretrained", "random"):
        r = results[init]
        aps = " ".join(f"{r['ap50'][c]:>8.3f}" for c in classes)
        print(f"{init:<11} {r['map50_abnormal']:>8.3f} {aps}")
    print("held-out cells per class: " + ", ".join(f"{c} {n}" for c, n in r["n_gt"].items()))
    t = cls.test
    print(
        f"classifier on {graded.name}: held-out AUC {t.auc:.3f} (95% CI {t.auc_ci_low:.3f}-"
        f"{t.auc_ci_high:.3f}), sensitivity {t.sensitivity:.3f}, specificity {t.specificity:.3f}"
        f" at threshold {cls.threshold:.3f} from validation; {t.n_pos} abnormal and {t.n_neg} "
        "NILM test slides"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
