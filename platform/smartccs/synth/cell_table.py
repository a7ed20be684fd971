"""The cell table's layout: ground-truth classes in code order and one row's fields.

Every other synth module reads or writes this table (drawing, placement, contours, rendering,
ground truth), so its layout lives alone and depends on nothing but the taxonomy. Cells are one
structured numpy array (about 200 bytes a cell, ~10^5 cells on a 20 mm slide).
"""

from __future__ import annotations

import numpy as np

from smartccs.taxonomy import ABNORMAL_CLASSES

NORMAL_KINDS: tuple[str, ...] = (
    "superficial",
    "intermediate",
    "parabasal",
    "inflammatory",
    "debris",
)
"""Normal content of a NILM smear (ground-truth classes that are not findings)."""

CELL_KINDS: tuple[str, ...] = (*NORMAL_KINDS, *ABNORMAL_CLASSES)
"""Every ground-truth class, in code order (``Specimen.cells['kind']`` indexes this)."""

KIND_CODE: dict[str, int] = {k: i for i, k in enumerate(CELL_KINDS)}

HARMONICS = 6
"""Fourier harmonics of a contour: enough for lobes, polygons and irregular membranes."""

CELL_DTYPE = np.dtype(
    [
        ("kind", "i1"),  # index into CELL_KINDS
        ("group", "i4"),  # sheet / cluster id, -1 for a single cell
        ("x", "f8"),  # centre, um
        ("y", "f8"),
        ("radius", "f4"),  # mean cytoplasm radius, um
        ("aspect", "f4"),  # sqrt(major/minor): axes are radius*aspect and radius/aspect
        ("theta", "f4"),  # rotation, radians
        ("shape", "f4", (HARMONICS, 2)),  # relative contour harmonics k=1..K (cos, sin)
        ("tail", "f4"),  # tadpole tail length along the long axis (normalised um), 0 = none
        ("tail_dir", "f4"),  # 0 or pi: which end of the long axis carries the tail
        ("density", "f4"),  # cytoplasm stain concentration (OD units)
        ("stain", "f4", (3,)),  # cytoplasm weights of eosin, light green, orange G
        ("nuc_dx", "f4"),  # nucleus centre offset from the cell centre, um
        ("nuc_dy", "f4"),
        ("nuc_radius", "f4"),  # 0 = anucleate (debris)
        ("nuc_aspect", "f4"),
        ("nuc_theta", "f4"),
        ("nuc_shape", "f4", (HARMONICS, 2)),
        ("nuc_darkness", "f4"),  # hematoxylin concentration (OD units)
        ("chromatin", "f4"),  # granularity: amplitude of the chromatin texture
        ("halo", "f4"),  # koilocytic halo radius / nucleus radius, 0 = none
        ("binucleate", "?"),
        ("nuc2_dx", "f4"),  # second nucleus offset, when binucleate
        ("nuc2_dy", "f4"),
        ("reach", "f4"),  # conservative radius around (x, y) holding everything drawn
        ("box", "f8", (4,)),  # tight x0, y0, x1, y1 of the cell, um (ground truth)
    ]
)
