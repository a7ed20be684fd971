"""A contact sheet of every synthetic cell class, to check by eye that they read as a Pap smear.

``python -m smartccs.synth.gallery OUT.png [--center NAME] [--profiles FILE] [--mpp 0.25]``
writes one labelled panel per class (a few cells at scanner resolution) plus a low-power
overview of a whole synthetic slide.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from smartccs.synth.cell_table import CELL_KINDS
from smartccs.synth.profiles import CenterProfile, load_profiles
from smartccs.synth.render import render_region
from smartccs.synth.specimen import Specimen, cells_in_disc, make_specimen

PANEL_UM = 120.0
CELLS_PER_PANEL = {"inflammatory": 8, "debris": 6, "HSIL": 8, "AGC": 30, "parabasal": 3}


def class_panel(
    profile: CenterProfile, kind: str, mpp: float, seed: int, panel_um: float = PANEL_UM
) -> np.ndarray:
    """A few cells of one class rendered as ``profile``'s scanner would show them."""
    rng = np.random.default_rng([seed, CELL_KINDS.index(kind)])
    n = CELLS_PER_PANEL.get(kind, 2)
    spread = panel_um * (0.12 if kind in ("AGC", "HSIL") else 0.25)
    cells = cells_in_disc(rng, kind, n, panel_um / 2, panel_um / 2, spread)
    specimen = Specimen.from_cells(panel_um, panel_um, cells, seed)
    side = round(panel_um / mpp)
    return render_region(specimen, profile, 0.0, 0.0, side, side, mpp, seed)


def overview(profile: CenterProfile, grade: str, side_px: int, seed: int) -> np.ndarray:
    """A 1 mm slide of ``grade`` seen at low power (about 2 um/px)."""
    specimen = make_specimen(np.random.default_rng(seed), 1000.0, 1000.0, profile, grade)
    return render_region(specimen, profile, 0.0, 0.0, side_px, side_px, 1000.0 / side_px, seed)


def contact_sheet(
    profile: CenterProfile, mpp: float = 0.25, seed: int = 0, columns: int = 4
) -> Image.Image:
    """Every class plus an overview, labelled, in a grid."""
    panels = [(k, class_panel(profile, k, mpp, seed)) for k in CELL_KINDS]
    side = panels[0][1].shape[0]
    panels.append(("HSIL slide, 1 mm", overview(profile, "HSIL", side, seed)))
    rows = -(-len(panels) // columns)
    sheet = Image.new("RGB", (columns * side, rows * (side + 18)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (label, img) in enumerate(panels):
        x, y = (i % columns) * side, (i // columns) * (side + 18)
        sheet.paste(Image.fromarray(img), (x, y + 18))
        draw.text((x + 4, y + 3), f"{label}  [{profile.name}, synthetic]", fill=(0, 0, 0))
    return sheet


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="PNG to write")
    parser.add_argument("--center", default=None, help="center name (default: the first)")
    parser.add_argument("--profiles", default=None, help="profiles YAML (default: built-ins)")
    parser.add_argument("--mpp", type=float, default=0.25, help="microns per pixel of panels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    profiles = load_profiles(args.profiles)
    profile = next((p for p in profiles if p.name == args.center), None) or profiles[0]
    if args.center and profile.name != args.center:
        parser.error(f"no center {args.center!r}; have {', '.join(p.name for p in profiles)}")
    contact_sheet(profile, args.mpp, args.seed).save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
