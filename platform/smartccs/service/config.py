"""The service's config: serve/config.yaml's application ``args`` are this model."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from smartccs.adaptation.config import AdaptConfig
from smartccs.screening.engine import ScreeningConfig
from smartccs.store import StoreConfig


class ServiceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    store: StoreConfig | None = Field(default=None, description="null: $CCS_STORE")
    screening: ScreeningConfig = ScreeningConfig(adapt=AdaptConfig(method="smartccs"))
    tokens: dict[str, str] = Field(
        default_factory=dict, description="center -> sha256 of its bearer token"
    )
    tokens_source: str | None = Field(
        default=None,
        description="JSON or a file path (a mounted Secret) with more center -> digest entries; "
        "null: $CCS_SERVICE_TOKENS",
    )
    lease_s: float = Field(
        default=300.0, gt=0, description="a running batch silent this long is taken over"
    )
    poll_s: float = Field(default=2.0, gt=0, description="how often an idle worker looks")
    workers_per_replica: int = Field(
        default=1,
        ge=1,
        description="batches a Screener replica screens side by side (each its own Ray Data "
        "stream over the cluster's scorers); more replicas or more workers: more centers at once",
    )
    centers_per_replica: int = Field(
        default=8, ge=1, description="adapted centers an adapter replica holds (LRU)"
    )
