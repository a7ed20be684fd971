"""The service's config: serve/config.yaml's application ``args`` are this model."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, HttpUrl

from smartccs.adaptation.config import AdaptConfig
from smartccs.engine.config import ScreeningConfig
from smartccs.ids import Id
from smartccs.store import StoreConfig


def _bare_base(url: HttpUrl) -> HttpUrl:
    """A base URL must be only that: a query, fragment or credentials would end up in every
    URL the service hands out."""
    if url.query or url.fragment or url.username or url.password:
        raise ValueError("must be scheme://host[:port][/path]: no query, fragment or credentials")
    return url


PublicUrl = Annotated[HttpUrl, AfterValidator(_bare_base)]


class Reviewer(BaseModel):
    """Whose sign-offs a reviewer token records: the center it reads and the name each review
    row carries (from here, never from the page)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    center: Id
    name: str = Field(min_length=1, max_length=120, pattern=r"^[^\x00-\x1f]+$")


class ServiceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    public_url: PublicUrl | None = Field(
        default=None,
        description="the service's address as its clients reach it, with any path prefix the "
        "ingress in front of Serve adds (e.g. https://screening.example.org/ccs); the URLs the "
        "API hands out (status_url, results_url) are built on it. null: they are paths from the "
        "service's root (/v1/batches/<id>), which a client resolves against the URL it called. "
        "Never taken from a request's Host or forwarding headers: any client sets those",
    )

    store: StoreConfig | None = Field(default=None, description="null: $CCS_STORE")
    screening: ScreeningConfig = ScreeningConfig(adapt=AdaptConfig(method="smartccs"))
    tokens: dict[str, str] = Field(
        default_factory=dict, description="center -> sha256 of its bearer token"
    )
    reviewers: dict[str, Reviewer] = Field(
        default_factory=dict,
        description="sha256 of a cytologist's token -> their center and name: the token reads "
        "that center's batches as the center's own does, and signs slides out in the review "
        "workstation under that name (`ccs token CENTER --reviewer NAME`)",
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

    def public(self, path: str) -> str:
        """The URL a client is given for ``path`` (``/v1/...``): on ``public_url`` when set,
        else the path alone."""
        return (str(self.public_url).rstrip("/") if self.public_url else "") + path
