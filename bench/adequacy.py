"""Adequacy bench: the squamous-cell estimate against the truth, slide by slide (SYNTHETIC data).

Two sets, each generated once under ``--out`` and reused:

- the demo's test slides: the cohort ``ccs demo`` generates (its ``StudyConfig`` defaults:
  5 centers x 12 tiny slides, seed 0, abnormal density x10), cut into batches exactly as the
  demo cuts them, keeping the test batches (36 slides);
- ``small`` slides (3 mm) of every built-in profile, ``--small-slides`` per profile.

Each slide is tiled on the demo detector's grid (``defaults.yaml``: 256 px at 0.5 µm/px) and
its tiles are read by the platform's own reader; the estimate is what the cell scorer puts on
the slide row (``count_squamous`` per tile, summed, scaled for failed tiles). The count needs
no model, so no detector is trained or run. The truth is what the cohort writes
(``ground_truth/slides.parquet``: superficial + intermediate + parabasal cells), and the
adequacy minimum is Bethesda's 5,000 pro-rated to each slide's scanned area.

    python bench/adequacy.py                      # writes bench/out/adequacy/, ~10 min, 2 CPUs
    python bench/adequacy.py --json bench/out/adequacy.json
    python bench/adequacy.py --demo-seed 1 --seed 1   # other slides: nothing was tuned on them
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from smartccs.manifest import MANIFEST_NAME, Manifest
from smartccs.models.detector import SQUAMOUS_KINDS
from smartccs.screening.adequacy import AdequacyConfig, required_squamous
from smartccs.screening.squamous import count_squamous
from smartccs.slide.reader import open_slide
from smartccs.slide.tiling import TilingConfig, plan_tiles, read_tile
from smartccs.study.cohort import center_kinds, cut_batches
from smartccs.study.config import StudyConfig, embedded_defaults
from smartccs.synth.cohort import generate_cohort

OUT = Path(__file__).resolve().parent / "out" / "adequacy"


def demo_test_slides(out: Path, seed: int, workers: int) -> list[tuple[Path, str]]:
    """(center folder, slide id) of the demo's test batches, generating its cohort once."""
    cfg = StudyConfig(cohort_dir=str(out), seed=seed)
    cohort = cfg.cohort_path()
    if not (cohort / "cohort.json").is_file():
        generate_cohort(
            cohort, centers=cfg.centers, slides_per_center=cfg.slides_per_center, size=cfg.size,
            seed=cfg.seed, abnormal_density_scale=cfg.abnormal_density_scale, workers=workers,
            progress=False,
        )  # fmt: skip
    center_kinds(cohort)  # the demo's own check that cohort.json names every center's kind
    cut = cut_batches(
        cohort, cohort / "batches", cfg.batch_tag(), cfg.test_fraction, cfg.batch_slides, cfg.seed
    )
    slides = []
    for folder, batch in cut:
        if batch.role == "test":
            manifest = Manifest.loads((folder / MANIFEST_NAME).read_bytes())
            slides += [(cohort / batch.center, s.slide_id) for s in manifest.slides]
    return sorted(slides, key=lambda s: s[1])


def small_slides(out: Path, per_profile: int, seed: int, workers: int) -> list[tuple[Path, str]]:
    """(center folder, slide id) of ``small`` slides of every built-in profile."""
    cohort = out / f"small-all-n{per_profile}-s{seed}"
    if not (cohort / "cohort.json").is_file():
        generate_cohort(
            cohort, slides_per_center=per_profile, size="small", seed=seed, workers=workers,
            progress=False,
        )  # fmt: skip
    return [
        (center, s.slide_id)
        for center in sorted(p.parent for p in cohort.glob(f"*/{MANIFEST_NAME}"))
        for s in Manifest.loads((center / MANIFEST_NAME).read_bytes()).slides
    ]


def measure(center: Path, slide_id: str, tiling: TilingConfig, adequacy: AdequacyConfig) -> dict:
    """One slide: truth, estimate, the minimum its scanned area needs."""
    truth_rows = pq.read_table(center / "ground_truth" / "slides.parquet").to_pylist()
    row = next(r for r in truth_rows if r["slide_id"] == slide_id)
    truth = sum(int(row[f"n_{k}"]) for k in SQUAMOUS_KINDS)
    slide = open_slide(next((center / "slides").glob(f"{slide_id}.*")))
    t0 = time.perf_counter()
    plan = plan_tiles(slide, tiling)
    count = 0
    for i in range(0, len(plan.tiles), 16):  # the cell scorer's batch size in the demo
        tiles = np.stack([read_tile(slide, t, tiling) for t in plan.tiles[i : i + 16]])
        count += int(count_squamous(tiles, tiling.target_mpp).sum())
    info = slide.info
    area_mm2 = info.width * info.height * info.mpp**2 / 1e6
    minimum = required_squamous(adequacy, area_mm2)
    return {
        "slide": slide_id,
        "profile": center.name,
        "grade": row["grade"],
        "abnormal": int(row["n_abnormal"]),
        "truth": truth,
        "estimate": count,
        "error": (count - truth) / truth,
        "minimum": minimum,
        "adequate": count >= minimum,
        "tiles": len(plan.tiles),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| slide | profile | grade | abnormal | truth | estimate | error | minimum | adequate |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['slide']} | {r['profile']} | {r['grade']} | {r['abnormal']} | {r['truth']} "
            f"| {r['estimate']} | {r['error']:+.2f} | {r['minimum']} "
            f"| {'yes' if r['adequate'] else 'no'} |"
        )
    return "\n".join(lines)


def summary(name: str, rows: list[dict]) -> dict:
    err = [abs(r["error"]) for r in rows]
    return {
        "set": name,
        "slides": len(rows),
        "median_abs_error": round(statistics.median(err), 3),
        "max_abs_error": round(max(err), 3),
        "mean_error": round(statistics.fmean(r["error"] for r in rows), 3),
        "adequate": sum(r["adequate"] for r in rows),
        "seconds_per_tile": round(
            sum(r["seconds"] for r in rows) / sum(r["tiles"] for r in rows), 4
        ),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=OUT, help="where the cohorts are generated")
    p.add_argument("--small-slides", type=int, default=2, help="small slides per profile")
    p.add_argument("--demo-seed", type=int, default=0, help="the demo cohort's seed (ccs demo: 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the small slides")
    p.add_argument("--workers", type=int, default=2, help="processes generating slides")
    p.add_argument("--json", type=Path, default=None, help="also write rows and summaries")
    args = p.parse_args(argv)
    tiling = TilingConfig.model_validate(embedded_defaults()["detector"]["stream"]["tiling"])
    adequacy = AdequacyConfig.model_validate(embedded_defaults()["screening"]["adequacy"])
    sets = {
        "demo test slides (tiny, 1 mm)": demo_test_slides(args.out, args.demo_seed, args.workers),
        f"small slides (3 mm), {args.small_slides} per built-in profile": small_slides(
            args.out, args.small_slides, args.seed, args.workers
        ),
    }
    print(f"SYNTHETIC slides; tiles {tiling.tile_px} px at {tiling.target_mpp} µm/px; "
          f"adequacy {adequacy.min_squamous} per {adequacy.preparation_diameter_mm:g} mm spot, "
          "pro-rated to the scanned area")  # fmt: skip
    report = {"command": " ".join(["python", "bench/adequacy.py", *sys.argv[1:]]), "sets": []}
    for name, slides in sets.items():
        rows = [measure(center, sid, tiling, adequacy) for center, sid in slides]
        s = summary(name, rows)
        print(f"\n### {name}\n\n{table(rows)}\n")
        print(
            f"{s['slides']} slides: median |error| {s['median_abs_error']:.3f}, max "
            f"{s['max_abs_error']:.3f}, mean error {s['mean_error']:+.3f}; adequate "
            f"{s['adequate']} of {s['slides']}; {1000 * s['seconds_per_tile']:.0f} ms per tile "
            "(read + count)"
        )
        report["sets"].append(s | {"rows": rows})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
