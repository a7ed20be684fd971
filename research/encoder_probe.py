"""Frozen-encoder probe: how well do an encoder's patch tokens tell the cell classes apart?

A detector finetuning study costs 10 minutes a detector on 2 CPUs and its result is dominated by
which classes a split's training slides hold (docs/studies/training.md). This probe asks the
narrower question first, in a few minutes and with no finetuning: around every annotated cell of one
cohort, a window at the detector's magnification goes through the frozen encoder; the patch
tokens under the cell's centre (and, apart, the class token) are the cell's feature; a
logistic regression learns the 7 detection classes (6 Bethesda classes and normal squamous)
from one cohort and is scored on another, generated with another seed. Random weights of the
same architecture are the baseline: what pretraining adds is the difference.

    python research/encoder_probe.py --encoders random,v20261203T095352902-bb678e
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from study_helpers import OUT

from smartccs.errors import StoreError
from smartccs.metrics.classification import roc_auc
from smartccs.models.artifacts import ModelCard, load_card, load_model
from smartccs.models.detector import DETECTION_CLASSES, NORMAL_SQUAMOUS, detection_class, normalize
from smartccs.models.encoder import build_from, fold_tokens, patch_grid
from smartccs.slide.reader import open_slide
from smartccs.store import Store

STUDY = OUT / "training-study"  # where research/training_study.py writes


def cohort_cells(cohort: Path, per_class: int, seed: int) -> list[dict]:
    """Every abnormal cell of the cohort and, per normal squamous class, up to ``per_class``
    cells drawn at random (normal squamous cells outnumber abnormal ones 50 to 1)."""
    rng = np.random.default_rng(seed)
    cells: list[dict] = []
    for center in sorted(p for p in cohort.iterdir() if p.is_dir()):
        slides = {
            r["slide_id"]: center / r["path"]
            for r in pq.read_table(center / "ground_truth" / "slides.parquet").to_pylist()
        }
        rows = pq.read_table(center / "ground_truth" / "cells.parquet").to_pylist()
        by_class: dict[int, list[dict]] = {}
        for r in rows:
            k = detection_class(r["class"])
            if k is not None:
                by_class.setdefault(k, []).append(r | {"label": k, "file": slides[r["slide_id"]]})
        for k, members in by_class.items():
            if DETECTION_CLASSES[k] == NORMAL_SQUAMOUS and len(members) > per_class:
                members = [members[i] for i in rng.choice(len(members), per_class, replace=False)]
            cells.extend(members)
    return cells


def windows(cells: list[dict], window_px: int, mpp: float, offsets: np.ndarray) -> np.ndarray:
    """(N, window_px, window_px, 3) uint8 at ``mpp``: each cell's centre ``offsets`` (N, 2; x, y
    window pixels) from the window's centre."""
    out = np.empty((len(cells), window_px, window_px, 3), np.uint8)
    by_file: dict[Path, list[int]] = {}
    for i, c in enumerate(cells):
        by_file.setdefault(c["file"], []).append(i)
    for file, idx in by_file.items():
        with open_slide(file) as slide:
            down = mpp / slide.info.mpp
            level = slide.best_level(down)
            scale = slide.info.level_downsamples[level]
            side0 = round(window_px * down)  # level-0 pixels
            side = round(side0 / scale)
            for i in idx:
                c = cells[i]
                cx = (c["x0"] + c["x1"]) / 2 - offsets[i, 0] * down
                cy = (c["y0"] + c["y1"]) / 2 - offsets[i, 1] * down
                rgb = slide.read_rgb(
                    level, round(cx - side0 / 2), round(cy - side0 / 2), side, side
                )
                t = torch.as_tensor(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
                t = F.interpolate(t, size=(window_px, window_px), mode="bilinear", antialias=True)
                out[i] = t[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()
    return out


@torch.no_grad()
def features(
    encoder: torch.nn.Module,
    card: ModelCard,
    pixels: np.ndarray,
    offsets: np.ndarray,
    backbone_window: int | None = None,
    batch: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Per window the mean of the 2x2 patch tokens nearest the cell's centre, read as the
    detector reads its tiles (``patch_grid``, windowed or not), and the class token."""
    encoder.eval()
    patch = int(encoder.patch_embed.patch_size[0])
    n = pixels.shape[1] // patch
    # token row/column of the 2x2 block around each cell centre
    first = np.clip(np.floor((pixels.shape[1] / 2 + offsets) / patch - 0.5), 0, n - 2).astype(int)
    centre, cls = [], []
    for s in range(0, len(pixels), batch):
        x = torch.as_tensor(pixels[s : s + batch]).permute(0, 3, 1, 2).float() / 255
        x = normalize(x, card.normalization)
        tokens = encoder.forward_features(x)  # the class token of the whole window
        cls.append(tokens[:, 0])
        if backbone_window is None:
            grid = fold_tokens(encoder, tokens, *x.shape[-2:])
        else:
            grid = patch_grid(encoder, x, backbone_window)
        for j in range(len(x)):
            c, r = first[s + j]
            centre.append(grid[j, :, r : r + 2, c : c + 2].mean(dim=(1, 2)))
    return torch.stack(centre).numpy(), torch.cat(cls).numpy()


def fit_probe(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float = 1e-3) -> torch.nn.Linear:
    """Multinomial logistic regression on standardised features, classes weighted inversely to
    their frequency (L-BFGS, full batch: a few thousand cells)."""
    torch.manual_seed(0)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    counts = torch.bincount(yt, minlength=n_classes).float().clamp(min=1)
    weight = counts.sum() / (n_classes * counts)
    lin = torch.nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(lin(xt), yt, weight=weight) + l2 * lin.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


def probe(train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray) -> dict:
    """Balanced accuracy over the classes present in the test set, and abnormal-vs-normal AUC
    of the summed abnormal probabilities."""
    mu, sd = train.mean(0), train.std(0) + 1e-6
    lin = fit_probe((train - mu) / sd, y_train, len(DETECTION_CLASSES))
    with torch.no_grad():
        p = lin(torch.as_tensor((test - mu) / sd)).softmax(-1).numpy()
    pred = p.argmax(1)
    recalls = {
        DETECTION_CLASSES[k]: float((pred[y_test == k] == k).mean()) for k in np.unique(y_test)
    }
    normal = DETECTION_CLASSES.index(NORMAL_SQUAMOUS)
    abnormal = y_test != normal
    return {
        "balanced_accuracy": float(np.mean(list(recalls.values()))),
        "recall": recalls,
        "auc_abnormal": float(roc_auc(abnormal.astype(int), 1 - p[:, normal])),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoders", required=True, help="comma-separated versions; 'random' too")
    ap.add_argument("--store", type=Path, default=STUDY / "store-cohort-small-6-seed0")
    ap.add_argument("--train-cohort", type=Path, default=STUDY / "cohort-small-6-seed0")
    ap.add_argument("--test-cohort", type=Path, default=STUDY / "common-test-small-6-seed30")
    ap.add_argument("--window-px", type=int, default=128, help="at the detector's 0.5 um/px")
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument(
        "--offset-px",
        type=int,
        default=0,
        help="place each cell up to this far (seeded, uniform) from the window's centre, as a "
        "detector's tile holds cells anywhere, not centred",
    )
    ap.add_argument(
        "--backbone-window",
        type=int,
        default=None,
        help="read windows as a detector with head.window_px does (None: whole)",
    )
    ap.add_argument("--normal-per-center", type=int, default=400)
    ap.add_argument("--random-seeds", default="0,1,2", help="'random' is averaged over these")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    command = "python research/encoder_probe.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    store = Store(str(args.store))
    versions = [v for v in args.encoders.split(",") if v]
    reference = next((v for v in versions if v != "random"), None)
    if reference is None:
        ap.error("--encoders: name at least one saved version (random takes its architecture)")
    for cohort in (args.train_cohort, args.test_cohort):
        if not (cohort / "cohort.json").exists():
            ap.error(f"{cohort}: not a generated cohort (no cohort.json)")
    try:  # every named version before minutes of reading windows
        cards = {
            v: load_card(store, "encoder", reference if v == "random" else v) for v in versions
        }
    except StoreError as e:
        ap.error(f"--encoders: {e}")
    t0 = time.perf_counter()
    sets = {}
    for name, cohort in (("train", args.train_cohort), ("test", args.test_cohort)):
        cells = cohort_cells(cohort, args.normal_per_center, seed=0)
        rng = np.random.default_rng(1)
        offsets = rng.integers(-args.offset_px, args.offset_px + 1, (len(cells), 2))
        sets[name] = (
            windows(cells, args.window_px, args.mpp, offsets),
            np.array([c["label"] for c in cells]),
            offsets,
        )
        print(f"{name}: {cohort.name}, {len(cells)} cells", flush=True)
    print(f"windows read in {time.perf_counter() - t0:.0f} s", flush=True)
    results: dict[str, dict] = {}
    for version in versions:
        card = cards[version]
        runs = []
        for seed in [int(s) for s in args.random_seeds.split(",")] if version == "random" else [0]:
            torch.manual_seed(seed)
            encoder = build_from(card.architecture)
            if version != "random":
                encoder.load_state_dict(load_model(store, "encoder", version)[1])
            (c_tr, k_tr), (c_te, k_te) = (
                features(encoder, card, sets[s][0], sets[s][2], args.backbone_window)
                for s in ("train", "test")
            )
            y_tr, y_te = sets["train"][1], sets["test"][1]
            runs.append(
                {"patch": probe(c_tr, y_tr, c_te, y_te), "cls": probe(k_tr, y_tr, k_te, y_te)}
            )
        results[version] = {
            token: {
                key: float(np.mean([r[token][key] for r in runs]))
                for key in ("balanced_accuracy", "auc_abnormal")
            }
            | {"runs": [r[token] for r in runs]}
            for token in ("patch", "cls")
        }
        for token in ("patch", "cls"):
            r = results[version][token]
            print(
                f"{version:<32} {token:<5} balanced accuracy {r['balanced_accuracy']:.3f}  "
                f"abnormal AUC {r['auc_abnormal']:.3f}",
                flush=True,
            )
    out = args.out or STUDY / f"probe-{'-'.join(v.rsplit('-', 1)[-1] for v in versions)}.json"
    out.write_text(json.dumps({"command": command, "results": results}, indent=2))
    print(f"SYNTHETIC cohorts; {command} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
