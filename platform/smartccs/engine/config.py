"""What a screening run is given and what it returns: one config for the job and the service."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field

from smartccs.adaptation.config import AdaptConfig
from smartccs.data.tiles import StreamConfig
from smartccs.ids import Id
from smartccs.results.tables import ResultCommit
from smartccs.screening.adequacy import AdequacyConfig
from smartccs.screening.threshold import ThresholdConfig


class ScorerPool(BaseModel):
    """The detector/embedder actors: on a GPU cluster one per GPU, here a CPU or two."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    actors: int = Field(default=1, ge=1)
    cpus: float = Field(default=1.0, gt=0)
    gpus: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=16, ge=1, description="tiles per detector call")
    fused: bool = Field(
        default=True,
        description="read tiles inside the scorer actors (no pixels in the object store); "
        "false: separate reader actors (stream.readers) feed the scorers",
    )


class ScreeningConfig(BaseModel):
    """What a screening run uses besides its batches; shared by the job and the service."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    classifier_model: Id = "classifier"
    classifier_version: str = Field(default="latest", description="resolved once, at start")
    stream: StreamConfig = StreamConfig(readers=1, reader_cpus=0.5, planner_cpus=0.25)
    scorers: ScorerPool = ScorerPool()
    adequacy: AdequacyConfig = AdequacyConfig()
    adapt: AdaptConfig = AdaptConfig()
    threshold: ThresholdConfig = ThresholdConfig()


class BatchOutcome(BaseModel):
    """One published batch."""

    model_config = ConfigDict(frozen=True)

    center: str
    batch: str
    run_id: str
    slides: int
    screened: int
    inadequate: int
    failed: int
    positive: int
    cells: int
    commit: ResultCommit
    adaptation: str | None = None
    rejected: int = 0  # not cytology (slide.specimen): neither scored nor negative


def new_run_id() -> str:
    return datetime.now(UTC).strftime("screen-%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
