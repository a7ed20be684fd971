"""Center profiles: what makes one synthetic screening center look unlike another.

Real multi-center data differ by scanner (pixel size, file format, compression), staining
protocol (hue, saturation, strength) and preparation (cell density, blur, noise) as well as by
case mix. A profile captures each of these as a number with a unit, so a cohort can shift from
internal to external centers in the ways Smart-CCS's test-time adaptation must absorb. The YAML
schema is documented in docs/synth.md.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from smartccs.errors import CCSError, describe_validation_error
from smartccs.ids import Id
from smartccs.taxonomy import GRADES, Grade

BUILTIN_PROFILES = "profiles.yaml"

OdVector = Annotated[
    tuple[float, float, float],
    Field(description="optical density absorbed per unit stain in the R, G and B channels"),
]


class ScannerProfile(BaseModel):
    """How the center's scanner digitises a slide."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mpp: float = Field(
        default=0.25, gt=0.05, le=2.0, description="microns per pixel at level 0 (0.25 = 40x)"
    )
    format: Literal["svs", "tiff"] = Field(
        default="svs", description="'svs' (Aperio, opens as vendor aperio) or 'tiff' (generic)"
    )
    pyramid_factor: Literal[2, 4] = Field(
        default=4, description="downsample between consecutive pyramid levels"
    )
    tile_size: int = Field(
        default=256, ge=64, le=1024, multiple_of=16, description="TIFF tile edge in pixels"
    )
    jpeg_quality: int = Field(default=85, ge=30, le=100, description="JPEG quality of the tiles")


class StainProfile(BaseModel):
    """The Papanicolaou stain as the center's protocol and reagents render it.

    Colours are optical-density vectors (Beer-Lambert): a pixel's transmitted light is
    ``background * exp(-sum_s c_s * v_s)`` over stains ``s`` with concentration ``c_s``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    hematoxylin: OdVector = Field(
        default=(0.65, 0.70, 0.29), description="nuclear stain (blue-purple); OD per R, G, B"
    )
    eosin: OdVector = Field(
        default=(0.10, 0.95, 0.30),
        description="eosin Y of EA, mature (superficial) cytoplasm, pink; OD per R, G, B",
    )
    light_green: OdVector = Field(
        default=(0.90, 0.22, 0.38),
        description="light green SF of EA, cyanophilic cytoplasm, blue-green; OD per R, G, B",
    )
    orange_g: OdVector = Field(
        default=(0.02, 0.38, 0.92),
        description="orange G, keratinised cytoplasm, orange; OD per R, G, B",
    )
    hue_shift_deg: float = Field(
        default=0.0,
        ge=-90.0,
        le=90.0,
        description="rotation of every stain vector about the grey axis, degrees (hue shift)",
    )
    saturation: float = Field(
        default=1.0, gt=0.0, le=3.0, description="scale of each stain's colour away from grey"
    )
    intensity: float = Field(
        default=1.0, gt=0.0, le=3.0, description="scale of all stain concentrations"
    )
    hematoxylin_scale: float = Field(
        default=1.0, gt=0.0, le=3.0, description="extra scale of the nuclear stain alone"
    )

    @field_validator("hematoxylin", "eosin", "light_green", "orange_g")
    @classmethod
    def _absorbs(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) < 0 or math.hypot(*v) < 1e-3:
            raise ValueError("an OD vector needs three non-negative numbers, not all zero")
        return v


class CenterProfile(BaseModel):
    """One synthetic screening center: its scanner, stain, preparation and case mix."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Id = Field(description="center id, used as folder name and slide-id prefix")
    kind: Literal["internal", "external"] = Field(
        description="internal centers train the models; external ones test generalisation"
    )
    scanner: ScannerProfile = Field(
        default_factory=ScannerProfile, description="digitisation settings"
    )
    stain: StainProfile = Field(default_factory=StainProfile, description="staining settings")
    brightness: float = Field(
        default=1.0, gt=0.3, le=1.5, description="illumination scale applied to the background"
    )
    background: tuple[int, int, int] = Field(
        default=(236, 234, 238), description="RGB (0-255) of empty glass under the illumination"
    )
    blur_um: float = Field(
        default=0.4, ge=0.0, le=5.0, description="Gaussian focus blur sigma in microns"
    )
    noise_sigma: float = Field(
        default=2.0, ge=0.0, le=20.0, description="sensor noise sigma in 8-bit grey levels"
    )
    cell_density_per_mm2: float = Field(
        default=300.0,
        gt=0.0,
        le=2000.0,
        description="mean count of normal cells per mm^2 of the preparation area",
    )
    abnormal_density_per_mm2: tuple[float, float] = Field(
        default=(3.0, 15.0),
        description="range (low, high) of abnormal cells per mm^2 on an abnormal slide",
    )
    prevalence: dict[Grade, float] = Field(
        description="probability of each slide grade; omitted grades are 0; must sum to 1"
    )

    @field_validator("name")
    @classmethod
    def _short_enough(cls, v: str) -> str:
        if len(v) > 58:
            raise ValueError("center name must be at most 58 characters (slide ids append 6)")
        return v

    @field_validator("background")
    @classmethod
    def _rgb(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if not all(0 <= c <= 255 for c in v):
            raise ValueError("background channels must lie in 0..255")
        return v

    @field_validator("abnormal_density_per_mm2")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < v[0] <= v[1]:
            raise ValueError("abnormal density range must satisfy 0 < low <= high")
        return v

    def with_abnormal_density_scaled(self, factor: float) -> CenterProfile:
        """The same center with ``factor`` times as many abnormal cells per abnormal slide.

        A 1 mm tiny slide of a real-world density carries 2-15 abnormal cells, too few for a
        slide classifier to rank slides on; scaling gives tiny slides the 20-100 of a small one
        at a ninth of the pixels. Stain, scanner, normal cells and grades are unchanged.
        """
        if not factor > 0:
            raise CCSError(f"abnormal density scale must be positive, got {factor}")
        lo, hi = self.abnormal_density_per_mm2
        return self.model_copy(update={"abnormal_density_per_mm2": (lo * factor, hi * factor)})

    @field_validator("prevalence")
    @classmethod
    def _distribution(cls, v: dict[str, float]) -> dict[str, float]:
        if any(p < 0 for p in v.values()):
            raise ValueError("prevalences must be non-negative")
        total = sum(v.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"prevalences must sum to 1, got {total:.6g}")
        return {g: float(v.get(g, 0.0)) for g in GRADES}


class ProfilesFile(BaseModel):
    """The YAML document: a list of centers under ``centers``."""

    model_config = ConfigDict(extra="forbid")

    centers: list[CenterProfile] = Field(min_length=1, description="the centers, in order")

    @field_validator("centers")
    @classmethod
    def _unique_names(cls, v: list[CenterProfile]) -> list[CenterProfile]:
        seen: set[str] = set()
        for c in v:
            if c.name in seen:
                raise ValueError(f"duplicate center name {c.name!r}")
            seen.add(c.name)
        return v


def abnormal_density_tag(scale: float) -> str:
    """Name suffix of a cohort at this abnormal density scale: none at the profiles' own, so
    a cohort at another density never shares a folder or batch name with the plain one."""
    return f"-a{scale:g}" if scale != 1 else ""


def load_profiles(path: str | Path | None = None) -> list[CenterProfile]:
    """Read center profiles from ``path`` (None: the built-ins), naming file and field on error."""
    if path is None:
        source = f"<built-in {BUILTIN_PROFILES}>"
        text = resources.files(__package__).joinpath(BUILTIN_PROFILES).read_text("utf-8")
    else:
        source = str(path)
        try:
            text = Path(path).read_text("utf-8")
        except OSError as exc:
            raise CCSError(f"{source}: cannot read profiles: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise CCSError(f"{source}:{where} invalid YAML: {getattr(exc, 'problem', exc)}") from None
    try:
        return ProfilesFile.model_validate(data).centers
    except ValidationError as exc:
        raise CCSError(f"{source}: {describe_validation_error(exc)}") from None
