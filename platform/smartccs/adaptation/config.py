"""How a screening run adapts to a center: one config for the batch job and the service."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

Method = Literal["none", "smartccs", "tent"]
METHODS: tuple[Method, ...] = get_args(Method)
ADAPTIVE_METHODS: tuple[Method, ...] = tuple(m for m in METHODS if m != "none")


class SmartCCSAdaptConfig(BaseModel):
    """The reference method on the MIL head (docs/adaptation.md): student, EMA teacher, InfoNCE."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lr: float = Field(default=1e-4, gt=0, description="student step size (Adam)")
    steps: int = Field(default=1, ge=1, description="optimizer steps per batch of slides")
    momentum: float = Field(default=0.999, ge=0, lt=1, description="teacher EMA momentum")
    temperature: float = Field(default=0.1, gt=0, description="InfoNCE temperature")
    consistency: float = Field(default=1.0, ge=0, description="weight of student-teacher KL")
    min_confidence: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="reliable-sample filter: only slides whose teacher puts at least this "
        "probability on one grade enter the loss",
    )


class TentAdaptConfig(BaseModel):
    """Entropy minimisation on the detector's normalisation layers over a batch's tiles."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lr: float = Field(default=1e-3, gt=0, description="step size (Adam) on norm weights/biases")
    tiles: int = Field(default=64, ge=1, description="tiles sampled from the batch, evenly")
    steps: int = Field(default=1, ge=1, description="passes over the sample")
    batch_size: int = Field(default=16, ge=1)
    locations: int = Field(
        default=16,
        ge=1,
        description="per tile, the most cell-like locations whose class entropy is minimised "
        "(glass, the rest of a tile, would teach the detector to see nothing)",
    )


class StainAdaptConfig(BaseModel):
    """Stain calibration (``smartccs.adaptation.stain``), before smartccs or tent adapt."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        default=True,
        description="measure each batch's stain and map a center outside the detector's "
        "training range into it (needs a detector card with a stain_reference)",
    )
    tiles: int = Field(default=64, ge=1, description="tiles sampled from the batch, evenly")


class AdaptConfig(BaseModel):
    """``method``: none (the source model), smartccs (MIL head) or tent (detector norms)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Method = "none"
    smartccs: SmartCCSAdaptConfig = SmartCCSAdaptConfig()
    tent: TentAdaptConfig = TentAdaptConfig()
    stain: StainAdaptConfig = StainAdaptConfig()
    max_drift: float = Field(
        default=0.1,
        gt=0,
        description="collapse guard: when the adapted parameters move further than this "
        "(L2, relative to the source's) the center is reset to the source model",
    )
    persist: bool = Field(
        default=True,
        description="carry the adapted state across a center's batches (versioned in the "
        "store); false: every batch starts from the source model, as the reference did",
    )
