"""Benchmark slides: one synthetic specimen from the cohort generator, at a chosen size."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from smartccs.synth.profiles import load_profiles
from smartccs.synth.scan import render_slide
from smartccs.synth.specimen import make_specimen
from smartccs.synth.writer import SlideFormat


def write_bench_slide(
    path: Path,
    *,
    side_px: int,
    mpp: float = 0.25,
    fmt: SlideFormat = "svs",
    pyramid_factor: int = 2,
    seed: int = 0,
) -> Path:
    """An HSIL specimen of ``side_px`` square at ``mpp``, scanned with the first internal
    center's optics and the given pyramid factor (2 like most TIFFs, 4 like Aperio)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = load_profiles(None)[0]
    profile = profile.model_copy(
        update={"scanner": profile.scanner.model_copy(update={"pyramid_factor": pyramid_factor})}
    )
    side_um = side_px * mpp
    specimen = make_specimen(np.random.default_rng(seed), side_um, side_um, profile, "HSIL")
    render_slide(specimen, profile, path, mpp=mpp, fmt=fmt)
    return path
