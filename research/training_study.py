"""The three training jobs on synthetic cohorts, with the detector's pretraining ablation.

1. Generates (once) an annotated cohort of internal centers (``--size small``), uploads it with
   its cell labels to a local store and pretrains the encoder with
   jobs/configs/pretrain-demo.yaml for ``--pretrain-steps``.
2. Finetunes jobs/configs/detector-demo.yaml twice, ``init: pretrained`` and ``init: random``,
   with identical data, split, steps and seed: held-out AP@0.5 per class for both.
   ``--label-slides N`` gives both arms the same label budget (``train_slides: N``, the first N
   training slides of each seed's split; test slides unchanged), while pretraining still
   sees every slide: the method's setting, many unlabelled slides and few labelled ones.
3. Trains jobs/configs/classifier-demo.yaml (on the pretrained detector) on a second, graded
   cohort of many tiny slides from the same centers: held-out AUC, sensitivity, specificity.

    python research/training_study.py                     # about 70 minutes on 2 busy CPU cores
    python research/training_study.py --label-slides 4 --detector-seeds 0 --no-classifier
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel, ValidationError
from study_helpers import OUT, REPO, generated_batches

from smartccs.errors import describe_validation_error
from smartccs.jobrunner import deep_merge
from smartccs.logs import configure_logging
from smartccs.raycluster import init_ray
from smartccs.store import Store
from smartccs.synth.profiles import abnormal_density_tag
from smartccs.train.classifier import ClassifierConfig, train_classifier
from smartccs.train.detector import (
    DetectorConfig,
    abnormal_ap_by_cells,
    abnormal_map,
    finetune_detector,
)
from smartccs.train.pretrain import PretrainConfig, pretrain

CONFIG_NAMES = ("pretrain", "detector", "classifier")
CONFIGS = REPO / "jobs" / "configs"


def _config(name: str, store: Store, override: dict | None = None, **update) -> dict:
    raw = deep_merge(yaml.safe_load((CONFIGS / name).read_text()), override or {})
    return raw | {"store": {"uri": store.config.uri}} | update


def _override(
    ap: argparse.ArgumentParser, flag: str, text: str, model: type[BaseModel], config: str
) -> dict:
    """A command line's YAML mapping of config fields, refused with the flag named: checked
    against the demo config it lays over (nested fields too) before any cohort is made."""
    try:
        override = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        ap.error(f"{flag}: not YAML ({str(e).splitlines()[0]})")
    if not isinstance(override, dict):
        ap.error(f"{flag}: a YAML mapping, not {text!r}")
    try:
        model.model_validate(deep_merge(yaml.safe_load((CONFIGS / config).read_text()), override))
    except ValidationError as e:
        ap.error(f"{flag}: {describe_validation_error(e)}")
    return override


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--centers", default="int-a,int-b,int-c,int-d")
    ap.add_argument("--slides-per-center", type=int, default=6)
    ap.add_argument("--size", default="small")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--detector-steps", type=int, default=300)
    ap.add_argument(
        "--detector-seeds",
        default="0,1,2",
        help="one pretrained-vs-random pair per seed (run seed and split seed)",
    )
    ap.add_argument(
        "--label-slides",
        type=int,
        default=None,
        help="label budget: the detector trains on only the first N training slides of each "
        "seed's split (test slides unchanged); pretraining still sees every slide",
    )
    ap.add_argument(
        "--inits",
        default="pretrained,random",
        help="detector arms to run (screening: 'pretrained' alone when random is unchanged)",
    )
    ap.add_argument(
        "--external",
        default="ext-a,ext-b,ext-c",
        help="external centers (another stain, scanner, pixel size and focus): their annotated "
        "tiny slides are never trained on and are scored as a second held-out set; '' for none",
    )
    ap.add_argument("--external-slides", type=int, default=12, help="annotated, per center")
    ap.add_argument(
        "--unlabelled-slides",
        type=int,
        default=0,
        help="per center (internal and external), small slides that only pretraining reads: "
        "the method's setting, many unlabelled slides from every center, few labelled ones",
    )
    ap.add_argument(
        "--pretrain-tile-share",
        type=float,
        default=1.0,
        help="pretraining's tile_share: about steps x 16 / all slides' 128 px tiles (a small "
        "slide has about 2200), so the run reads every slide instead of the first ones",
    )
    ap.add_argument(
        "--pretrain-seeds",
        default=None,
        help="one encoder per detector seed, pretrained with these seeds in the order of "
        "--detector-seeds (default: one encoder, pretrained with --seed, for all): a pretraining "
        "run's encoder varies run to run, so the arms are compared across encoders",
    )
    ap.add_argument("--no-classifier", action="store_true", help="stop after the detectors")
    ap.add_argument(
        "--detector-version",
        default=None,
        help="train only the classifier, on this saved detector-pretrained version",
    )
    ap.add_argument(
        "--encoder-version",
        default=None,
        help="detectors on this saved encoder instead of a new pretraining run (finetuning "
        "changes compared on one encoder); its version names the study",
    )
    ap.add_argument(
        "--detector-override",
        default="",
        help="YAML mapping merged into detector-demo.yaml for both arms, e.g. "
        "'{layer_decay: 1.0}': a finetuning variant beside a study (it names the run)",
    )
    ap.add_argument(
        "--pretrain-override",
        default="",
        help="YAML mapping merged (nested mappings key by key) into pretrain-demo.yaml, e.g. "
        "'{crops: {hue_deg: 30}}'; it names the pretraining and detector runs",
    )
    ap.add_argument("--classifier-slides", type=int, default=24, help="tiny slides per center")
    ap.add_argument(
        "--classifier-abnormal-density",
        type=float,
        default=1.0,
        help="abnormal cells per abnormal slide of the graded cohort, times the profiles' "
        "(10: a tiny slide carries a small one's 20-100, enough to rank slides by)",
    )
    ap.add_argument("--out", type=Path, default=OUT / "training-study")
    args = ap.parse_args(argv)
    detector_override = _override(
        ap, "--detector-override", args.detector_override, DetectorConfig, "detector-demo.yaml"
    )
    pretrain_override = _override(
        ap, "--pretrain-override", args.pretrain_override, PretrainConfig, "pretrain-demo.yaml"
    )
    detector_seeds = [int(v) for v in args.detector_seeds.split(",") if v]
    pretrain_seeds = (
        [args.seed]
        if args.pretrain_seeds is None
        else [int(v) for v in args.pretrain_seeds.split(",")]
    )
    if args.pretrain_seeds is not None and (
        len(pretrain_seeds) != len(detector_seeds) or args.encoder_version or args.detector_version
    ):
        ap.error(
            "--pretrain-seeds: one per detector seed (--detector-seeds), and not with a saved "
            "--encoder-version or --detector-version"
        )
    command = "python research/training_study.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    configure_logging(1)
    cohort = args.out / f"cohort-{args.size}-{args.slides_per_center}-seed{args.seed}"
    input_px = yaml.safe_load((CONFIGS / "detector-demo.yaml").read_text())["input_px"]
    configs = b"".join((CONFIGS / f"{n}-demo.yaml").read_bytes() for n in CONFIG_NAMES)
    # a new config is a new run: never resume an earlier config's checkpoints
    # a saved encoder is named by its version's suffix (run names are at most 64 characters)
    encoder = (
        f"p{args.pretrain_steps}"
        if args.encoder_version is None
        else f"e{args.encoder_version.rsplit('-', 1)[-1]}"
    )
    # a detector override names the detector runs (its hash joins the configs'); a pretraining
    # override names both, since the detectors start from its encoder
    override = json.dumps(detector_override, sort_keys=True).encode() if detector_override else b""
    if pretrain_override:
        configs += b"pretrain-override:" + json.dumps(pretrain_override, sort_keys=True).encode()
    if args.pretrain_seeds is not None:  # other encoders: other pretraining and detector runs
        configs += b"pretrain-seeds:" + args.pretrain_seeds.encode()
    suffix = f"-u{args.unlabelled_slides}" if args.unlabelled_slides else ""
    if args.pretrain_tile_share < 1:
        suffix += f"-t{args.pretrain_tile_share:g}"

    def _tag(content: bytes) -> str:
        head = f"{encoder}-d{args.detector_steps}-i{input_px}-seed{args.seed}"
        return f"{head}-{hashlib.sha256(content).hexdigest()[:6]}{suffix}"

    tag = _tag(configs)
    det_tag = _tag(configs + override)
    if args.label_slides is not None:
        det_tag += f"-l{args.label_slides}"
    store = Store(str(args.out / f"store-{cohort.name}"))
    annotated = generated_batches(
        store, cohort, args.centers.split(","), args.slides_per_center, args.size, args.seed,
        "bench",
    )  # fmt: skip
    external = [c for c in args.external.split(",") if c]
    holdout = generated_batches(
        store, args.out / f"external-tiny-{args.external_slides}-seed{args.seed + 5}",
        external, args.external_slides, "tiny", args.seed + 5, "holdout",
    )  # fmt: skip
    unlabelled = generated_batches(
        store, args.out / f"unlabelled-small-{args.unlabelled_slides}-seed{args.seed + 7}",
        args.centers.split(",") + external, args.unlabelled_slides, "small", args.seed + 7,
        "unlabelled",
    )  # fmt: skip
    init_ray()
    t0 = time.perf_counter()
    encoders: list[str | None] = [args.encoder_version]
    if not args.detector_version and not args.encoder_version:  # saved models: no pretraining
        encoders = [
            pretrain(
                PretrainConfig.model_validate(
                    _config(
                        "pretrain-demo.yaml", store, pretrain_override,
                        run_name=f"pretrain-{tag}" + (f"-ps{ps}" if args.pretrain_seeds else ""),
                        max_steps=args.pretrain_steps, seed=ps,
                        batches=annotated + unlabelled, tile_share=args.pretrain_tile_share,
                    )
                )
            ).version
            for ps in pretrain_seeds
        ]  # fmt: skip
    enc_of = dict(zip(detector_seeds, encoders, strict=True)) if len(encoders) > 1 else {}
    t_pretrain = time.perf_counter() - t0
    inits = [] if args.detector_version else args.inits.split(",")
    results: dict = {init: [] for init in inits}
    detector_versions = {"pretrained": args.detector_version} if args.detector_version else {}
    for seed in detector_seeds:
        enc_version = enc_of.get(seed, encoders[0])
        for init in inits:
            t0 = time.perf_counter()
            raw = _config(
                "detector-demo.yaml", store, detector_override,
                run_name=f"detector-{init}-{det_tag}-s{seed}",
                model_name=f"detector-{init}", init=init, encoder_version=enc_version,
                max_steps=args.detector_steps, seed=seed, batches=annotated,
                train_slides=args.label_slides, holdout_batches=holdout,
            )  # fmt: skip
            raw["split"] = dict(raw.get("split", {}), seed=seed)
            r = finetune_detector(DetectorConfig.model_validate(raw))
            detector_versions.setdefault(init, r.version)
            row = {"seed": seed, "encoder": enc_version, "map50_abnormal": abnormal_map(r.report),
                   "ap50": r.report.ap, "n_gt": r.report.n_gt}  # fmt: skip
            for key, rep in (
                ("external", r.holdout),
                ("external_calibrated", r.holdout_calibrated),
            ):
                if rep is not None:
                    row[key] = {"map50_abnormal": abnormal_map(rep), "ap50": rep.ap,
                                "n_gt": rep.n_gt}  # fmt: skip
            results[init].append(row | {"seconds": time.perf_counter() - t0})
            print(f"seed {seed} {init}: abnormal mAP@0.5 {row['map50_abnormal']:.3f}", end="")
            print(f", external {row['external']['map50_abnormal']:.3f}" if holdout else "")
    summary = {
        "command": command,
        "cohort": str(cohort),
        "encoder": encoders[0] if len(encoders) == 1 else encoders,
        "pretrain_seeds": pretrain_seeds if args.pretrain_seeds is not None else None,
        "label_slides": args.label_slides,
        "detector_override": detector_override,
        "pretrain_override": pretrain_override,
        "external": holdout,
        "unlabelled": unlabelled,
        "pretrain_seconds": t_pretrain,
        "results": results,
    }
    cls = None
    # another graded cohort is another classifier run: never resume the plain one's
    density = args.classifier_abnormal_density
    dense = abnormal_density_tag(density)
    if not args.no_classifier and "pretrained" in detector_versions:
        graded = args.out / f"graded-tiny-{args.classifier_slides}-seed{args.seed + 1}{dense}"
        graded_batches = generated_batches(
            store, graded, args.centers.split(","), args.classifier_slides, "tiny",
            args.seed + 1, f"graded{dense}", abnormal_density_scale=density,
        )  # fmt: skip
        t0 = time.perf_counter()
        cls = train_classifier(
            ClassifierConfig.model_validate(
                _config(
                    "classifier-demo.yaml", store, run_name=f"classifier-{tag}{dense}",
                    batches=graded_batches, detector_model="detector-pretrained", seed=args.seed,
                    detector_version=detector_versions["pretrained"],
                )
            )
        )  # fmt: skip
        results["classifier"] = cls.test.model_dump() | {"seconds": time.perf_counter() - t0}
        summary["graded_cohort"] = str(graded)
    args.out.mkdir(parents=True, exist_ok=True)
    name = det_tag if inits == ["pretrained", "random"] else f"{det_tag}-{'-'.join(inits)}"
    if not args.detector_seeds:  # pretraining alone: the encoder for a probe or a later study
        name += "-pretrain"
    elif args.detector_seeds != "0,1,2":  # more seeds of a study write beside it
        name += "-s" + args.detector_seeds.replace(",", "")
    if args.detector_version:
        name = f"{det_tag}-classifier-{args.detector_version}{dense}"
    (args.out / f"{name}.json").write_text(json.dumps(summary, indent=2, default=float))
    print(f"\nSYNTHETIC cohorts; {command}")
    by_cells = lambda x: abnormal_ap_by_cells(x["ap50"], x["n_gt"])  # noqa: E731
    sets = [
        (f"abnormal mAP@0.5, held-out slides of {cohort.name}", lambda x: x["map50_abnormal"]),
        ("abnormal AP@0.5 weighted by held-out cells, same slides", by_cells),
    ]
    if holdout:
        sets.append(
            (f"abnormal mAP@0.5, external centers {args.external}",
             lambda x: x["external"]["map50_abnormal"])
        )  # fmt: skip
    if holdout and all("external_calibrated" in x for arm in inits for x in results[arm]):
        sets.append(
            ("abnormal mAP@0.5, external centers, each seen through its stain calibration",
             lambda x: x["external_calibrated"]["map50_abnormal"])
        )  # fmt: skip
    for title, value in sets:
        print(title)
        print_arms(results, inits, value)
    if cls is not None:
        t = cls.test
        print(
            f"classifier on {summary['graded_cohort']}: held-out AUC {t.auc:.3f} (95% CI "
            f"{t.auc_ci_low:.3f}-{t.auc_ci_high:.3f}), sensitivity {t.sensitivity:.3f}, "
            f"specificity {t.specificity:.3f} at threshold {cls.threshold:.3f} from validation; "
            f"{t.n_pos} abnormal and {t.n_neg} NILM test slides"
        )
    return 0


def print_arms(results: dict, inits: list[str], value) -> None:
    """Per seed each arm's value, the pretrained-minus-random differences, and their paired
    summary: mean, standard deviation, paired t and the exact two-sided sign-flip p."""
    for init in inits:
        print(f"{init:<10} per seed " + " ".join(f"{value(x):.3f}" for x in results[init]))
    if not {"pretrained", "random"} <= set(inits):
        return
    pairs = list(zip(results["pretrained"], results["random"], strict=True))
    print(f"{'seed':<6} {'pretrained':>10} {'random':>10} {'difference':>10}")
    for p, r in pairs:
        print(f"{p['seed']:<6} {value(p):>10.3f} {value(r):>10.3f} {value(p) - value(r):>+10.3f}")
    diffs = np.array([value(p) - value(r) for p, r in pairs])
    mean = {k: statistics.mean(value(x) for x in results[k]) for k in ("pretrained", "random")}
    sd = float(diffs.std(ddof=1)) if len(diffs) > 1 else float("nan")
    t = float(diffs.mean() / (sd / np.sqrt(len(diffs)))) if sd > 0 else float("nan")
    flips = np.array(np.meshgrid(*[[-1, 1]] * len(diffs))).reshape(len(diffs), -1).T
    p = float(np.mean(np.abs((flips * diffs).mean(axis=1)) >= abs(diffs.mean()) - 1e-12))
    print(
        f"{'mean':<6} {mean['pretrained']:>10.3f} {mean['random']:>10.3f} "
        f"{diffs.mean():>+10.3f}  (pretrained ahead in {int((diffs > 0).sum())} of "
        f"{len(diffs)} seeds; sd {sd:.3f}, paired t {t:.2f}, sign-flip p {p:.3f})"
    )


if __name__ == "__main__":
    sys.exit(main())
