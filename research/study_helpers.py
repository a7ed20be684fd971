"""What the research scripts share: where they write, and the extra cohorts they generate.

Not part of the library: the product never calls these (``smartccs.study.cohort`` keeps
what the main job uses; ``generated_batches`` is built on its ``ensure_uploaded``).
"""

from __future__ import annotations

from pathlib import Path

from smartccs.store import Store
from smartccs.study.cohort import ensure_uploaded, generated_centers

REPO = Path(__file__).resolve().parents[1]
# the scratch folder the benchmarks write to too (git-ignored, removed by `make clean`), so the
# paths the study logs in docs/studies/ name stay where they were
OUT = REPO / "bench" / "out"


def generated_batches(
    store: Store,
    out: Path,
    centers: list[str],
    slides_per_center: int,
    size: str,
    seed: int,
    batch: str,
    abnormal_density_scale: float = 1.0,
) -> list[str]:
    """Slides of these centers generated once under ``out`` and uploaded (with their cell
    annotations) as ``center/batch``: the extra held-out or unlabelled sets of a study."""
    from smartccs.synth.cohort import generate_cohort  # the renderer only where slides are made

    if not centers or slides_per_center == 0:
        return []
    if not (out / "cohort.json").is_file():
        generate_cohort(
            out,
            center_names=centers,
            slides_per_center=slides_per_center,
            size=size,
            seed=seed,
            abnormal_density_scale=abnormal_density_scale,
        )
    return [f"{d.name}/{ensure_uploaded(store, d, d.name, batch).batch}"
            for d in generated_centers(out)]  # fmt: skip
