"""What each cell kind looks like: the parameter ranges its cells are drawn from.

Morphology follows The Bethesda System: normal squamous cells (superficial, intermediate,
parabasal), inflammatory cells, debris and overlapping sheets, and the six abnormal classes with
their hallmarks (nuclear enlargement, hyperchromasia, irregular contours, rising N/C ratio,
koilocytic halos, keratinised bizarre shapes, crowded glandular groups). The table is data, kept
apart from the code that samples it so the cytology can be read and reviewed on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

Range = tuple[float, float]


@dataclass(frozen=True)
class Morphology:
    """Ranges one cell kind's parameters are drawn from (um and OD units)."""

    radius: Range  # mean cytoplasm radius
    elongation: Range  # major / minor axis ratio
    irregularity: float  # contour harmonic amplitude
    density: Range  # cytoplasm stain concentration
    eosin: Range
    light_green: Range
    orange: Range
    nucleus: Range  # nucleus radius in um (ignored when nc is set)
    nucleus_elongation: Range
    nucleus_irregularity: Range
    darkness: Range  # hematoxylin concentration
    chromatin: Range
    nc: Range | None = None  # nucleus radius / cell radius, for the high-N/C classes
    offset: float = 0.2  # how far off-centre the nucleus may sit, fraction of radius
    lobes: int = 0  # segmented nuclei (neutrophils): harmonic carrying the lobes
    halo: Range = (0.0, 0.0)  # koilocytic halo, multiple of the nucleus radius
    binucleate: float = 0.0  # probability of a second nucleus
    tail: float = 0.0  # probability of a tadpole tail
    tail_length: Range = (0.0, 0.0)  # multiple of the radius


MORPHOLOGY: dict[str, Morphology] = {
    # Mature squamous cells: large flat polygonal cells, pyknotic nucleus, eosinophilic.
    "superficial": Morphology(
        radius=(19, 25),
        elongation=(1.0, 1.6),
        irregularity=0.1,
        density=(0.30, 0.45),
        eosin=(0.45, 0.75),
        light_green=(0.0, 0.1),
        orange=(0.3, 0.6),
        nucleus=(1.9, 2.6),
        nucleus_elongation=(1.0, 1.2),
        nucleus_irregularity=(0.01, 0.03),
        darkness=(1.7, 2.2),
        chromatin=(0.05, 0.15),
    ),
    # The reference cell: intermediate nucleus (~35 um^2) is the yardstick of ASC-US/LSIL.
    "intermediate": Morphology(
        radius=(16, 23),
        elongation=(1.0, 1.6),
        irregularity=0.1,
        density=(0.30, 0.45),
        eosin=(0.0, 0.15),
        light_green=(0.75, 1.0),
        orange=(0.0, 0.05),
        nucleus=(3.0, 3.6),
        nucleus_elongation=(1.0, 1.3),
        nucleus_irregularity=(0.02, 0.05),
        darkness=(0.9, 1.2),
        chromatin=(0.2, 0.3),
        offset=0.25,
    ),
    "parabasal": Morphology(
        radius=(7.5, 12.5),
        elongation=(1.0, 1.35),
        irregularity=0.04,
        density=(0.55, 0.8),
        eosin=(0.0, 0.1),
        light_green=(0.85, 1.0),
        orange=(0.0, 0.0),
        nucleus=(3.3, 4.2),
        nucleus_elongation=(1.0, 1.25),
        nucleus_irregularity=(0.02, 0.05),
        darkness=(1.0, 1.3),
        chromatin=(0.2, 0.3),
        offset=0.15,
    ),
    # Neutrophils: small pale cells with a segmented (2-4 lobed) dark nucleus.
    "inflammatory": Morphology(
        radius=(5.0, 6.5),
        elongation=(1.0, 1.2),
        irregularity=0.05,
        density=(0.15, 0.25),
        eosin=(0.2, 0.5),
        light_green=(0.4, 0.7),
        orange=(0.0, 0.0),
        nucleus=(2.8, 3.5),
        nucleus_elongation=(1.0, 1.3),
        nucleus_irregularity=(0.45, 0.65),
        darkness=(1.6, 2.0),
        chromatin=(0.05, 0.1),
        offset=0.1,
        lobes=3,
    ),
    # Anucleate debris, mucus flecks and bare cytoplasm fragments.
    "debris": Morphology(
        radius=(2.0, 10.0),
        elongation=(1.0, 3.0),
        irregularity=0.22,
        density=(0.1, 0.35),
        eosin=(0.0, 1.0),
        light_green=(0.0, 1.0),
        orange=(0.0, 0.5),
        nucleus=(0.0, 0.0),
        nucleus_elongation=(1.0, 1.0),
        nucleus_irregularity=(0.0, 0.0),
        darkness=(0.0, 0.0),
        chromatin=(0.0, 0.0),
    ),
    # ASC-US: mature cytoplasm, nucleus 2.5-3x the intermediate nucleus area, mild hyperchromasia.
    "ASC-US": Morphology(
        radius=(16, 23),
        elongation=(1.0, 1.5),
        irregularity=0.07,
        density=(0.30, 0.45),
        eosin=(0.0, 0.3),
        light_green=(0.7, 1.0),
        orange=(0.0, 0.05),
        nucleus=(5.3, 5.9),
        nucleus_elongation=(1.0, 1.35),
        nucleus_irregularity=(0.04, 0.07),
        darkness=(1.3, 1.6),
        chromatin=(0.25, 0.35),
    ),
    # LSIL: koilocytes: enlarged raisinoid nucleus, sharp clear perinuclear halo, dense rim.
    "LSIL": Morphology(
        radius=(17, 24),
        elongation=(1.0, 1.5),
        irregularity=0.08,
        density=(0.45, 0.6),
        eosin=(0.0, 0.4),
        light_green=(0.6, 1.0),
        orange=(0.0, 0.1),
        nucleus=(5.8, 7.2),
        nucleus_elongation=(1.0, 1.4),
        nucleus_irregularity=(0.10, 0.16),
        darkness=(1.6, 2.0),
        chromatin=(0.35, 0.45),
        offset=0.1,
        halo=(1.9, 2.6),
        binucleate=0.3,
    ),
    # ASC-H: small immature (metaplastic-sized) cells with a high N/C ratio.
    "ASC-H": Morphology(
        radius=(7.0, 10.5),
        elongation=(1.0, 1.35),
        irregularity=0.05,
        density=(0.55, 0.8),
        eosin=(0.0, 0.1),
        light_green=(0.8, 1.0),
        orange=(0.0, 0.0),
        nucleus=(0.0, 0.0),
        nucleus_elongation=(1.0, 1.3),
        nucleus_irregularity=(0.06, 0.1),
        darkness=(1.5, 1.9),
        chromatin=(0.35, 0.45),
        nc=(0.5, 0.62),
        offset=0.1,
    ),
    # HSIL: small cells, very high N/C, hyperchromatic coarse irregular nuclei, loose groups.
    "HSIL": Morphology(
        radius=(5.5, 9.0),
        elongation=(1.0, 1.4),
        irregularity=0.08,
        density=(0.45, 0.7),
        eosin=(0.0, 0.1),
        light_green=(0.8, 1.0),
        orange=(0.0, 0.0),
        nucleus=(0.0, 0.0),
        nucleus_elongation=(1.0, 1.45),
        nucleus_irregularity=(0.12, 0.2),
        darkness=(2.0, 2.5),
        chromatin=(0.5, 0.6),
        nc=(0.72, 0.86),
        offset=0.05,
    ),
    # Keratinising SCC: bizarre spindle/tadpole cells, dense orange cytoplasm, ink-dark nuclei.
    "SCC": Morphology(
        radius=(8, 16),
        elongation=(1.5, 3.5),
        irregularity=0.14,
        density=(0.6, 0.9),
        eosin=(0.1, 0.3),
        light_green=(0.0, 0.05),
        orange=(0.8, 1.0),
        nucleus=(3.5, 6.5),
        nucleus_elongation=(1.2, 2.5),
        nucleus_irregularity=(0.15, 0.25),
        darkness=(2.6, 3.2),
        chromatin=(0.25, 0.35),
        offset=0.15,
        tail=0.4,
        tail_length=(0.8, 1.8),
    ),
    # AGC: crowded glandular (columnar) cells with enlarged nuclei, in honeycomb clusters.
    "AGC": Morphology(
        radius=(5.0, 7.0),
        elongation=(1.0, 1.3),
        irregularity=0.05,
        density=(0.3, 0.45),
        eosin=(0.0, 0.2),
        light_green=(0.7, 1.0),
        orange=(0.0, 0.0),
        nucleus=(3.6, 4.6),
        nucleus_elongation=(1.1, 1.5),
        nucleus_irregularity=(0.06, 0.1),
        darkness=(1.4, 1.8),
        chromatin=(0.3, 0.4),
        offset=0.1,
    ),
}
