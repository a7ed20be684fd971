"""Which centers a cohort has and which grade each of their slides gets.

Planning is the only place seeds are split: a center's grades come from
``SeedSequence([seed, center key])`` and each slide's scene from ``[seed, center key, number]``
(``SlideJob``), where the key is a CRC of the center name, so a center's slides do not change
when other centers are added or selected.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from smartccs.errors import CCSError
from smartccs.synth.profiles import CenterProfile
from smartccs.synth.slide_job import SlideJob
from smartccs.taxonomy import GRADES


def plan_center(
    profile: CenterProfile, center_dir: Path, slides: int, extent_um: float, seed: int
) -> list[SlideJob]:
    """The center's slide jobs, with grades allocated; creates its working folders."""
    key = zlib.crc32(profile.name.encode())
    rng = np.random.default_rng(np.random.SeedSequence([seed, key]))
    grades = _allocate_grades(rng, profile.prevalence, slides)
    (center_dir / "slides" / ".partial").mkdir(parents=True, exist_ok=True)
    (center_dir / "ground_truth" / ".parts").mkdir(parents=True, exist_ok=True)
    return [
        SlideJob(profile, key, i + 1, g, extent_um, seed, center_dir) for i, g in enumerate(grades)
    ]


def choose_centers(
    profiles: list[CenterProfile], n: int | None, names: list[str] | None
) -> list[CenterProfile]:
    """The profiles a cohort uses: the first ``n``, those ``names`` (in that order), or all."""
    if n is not None and names is not None:
        raise CCSError("give either a number of centers or center names, not both")
    if names is not None:
        by_name = {p.name: p for p in profiles}
        unknown = [x for x in names if x not in by_name]
        if unknown:
            raise CCSError(
                f"unknown center(s) {', '.join(unknown)}; profiles define {', '.join(by_name)}"
            )
        if len(set(names)) != len(names):
            raise CCSError(f"center names repeat: {', '.join(names)}")
        return [by_name[x] for x in names]
    if n is None:
        return profiles
    if not 1 <= n <= len(profiles):
        raise CCSError(f"centers must be between 1 and {len(profiles)} (profiles defined), got {n}")
    return profiles[:n]


def _allocate_grades(rng: np.random.Generator, prevalence: dict[str, float], n: int) -> list[str]:
    """Grades in proportion to prevalence, shuffled.

    Each grade gets the whole part of its expected count; the slides left over go to distinct
    grades drawn with probability proportional to the fractional parts. Unlike independent
    draws, a handful of slides per center still mixes NILM and abnormal slides, and unlike a
    fixed largest-remainder rule, centers differ in which findings they carry.
    """
    expected = np.array([prevalence.get(g, 0.0) * n for g in GRADES])
    counts = np.floor(expected + 1e-9).astype(int)
    fraction = np.clip(expected - counts, 0.0, None)
    left = n - int(counts.sum())
    if left:
        extra = rng.choice(len(GRADES), size=left, replace=False, p=fraction / fraction.sum())
        counts[extra] += 1
    grades = [g for g, c in zip(GRADES, counts, strict=True) for _ in range(c)]
    return [grades[i] for i in rng.permutation(n)]
