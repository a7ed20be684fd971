"""The batch screening job's config and run: ``python -m jobs.screen`` and ``ccs screen``.

Batches and the model may be named by id (``int-a/b1``, ``classifier/3``) or by their full
URI (``s3://bkt/ccs/incoming/int-a/b1``, ``./ccs-data/models/classifier/latest``); a URI also
says which store to use when none is given.
"""

from __future__ import annotations

import logging

from pydantic import BaseModel, ConfigDict, Field

from smartccs import layout
from smartccs.adaptation.config import Method
from smartccs.batches import resolve_batches
from smartccs.engine.config import BatchOutcome, ScreeningConfig
from smartccs.engine.screen import screen_batches
from smartccs.errors import CCSError
from smartccs.models.artifacts import require_model
from smartccs.screening.slides import check_adaptation
from smartccs.store import Store, StoreConfig, open_store

log = logging.getLogger(__name__)


class ScreenJobConfig(BaseModel):
    """jobs/configs/screen-*.yaml is this model."""

    model_config = ConfigDict(extra="forbid")

    store: StoreConfig | None = Field(
        default=None, description="null: the root of the batch/model URIs, else $CCS_STORE"
    )
    batches: list[str] = Field(
        default_factory=list,
        description="'center/batch' ids or batch URIs; empty: every committed batch (a cohort)",
    )
    model: str | None = Field(
        default=None,
        description="classifier id or URI ('classifier', 'classifier/3', '<store>/models/...'); "
        "null: screening.classifier_model at its latest version",
    )
    run_id: str | None = Field(default=None, description="null: a new id per run")
    adapt: Method | None = Field(
        default=None, description="test-time adaptation; null: screening.adapt.method"
    )
    screening: ScreeningConfig = ScreeningConfig()


class ScreenJobResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    run_id: str
    store: str
    batches: list[BatchOutcome]


def _one_root(roots: set[str], where: str) -> str | None:
    if len(roots) > 1:
        raise CCSError(f"{where} name different stores ({', '.join(sorted(roots))}): pass --store")
    return next(iter(roots), None)


def resolve(cfg: ScreenJobConfig) -> tuple[Store, list[str], ScreeningConfig]:
    """The store, 'center/batch' ids and screening config a job config means."""
    roots: set[str] = set()
    ids = []
    for item in cfg.batches:
        root, parts = layout.locate(item, "incoming")
        if len(parts) != 2 or not all(parts):
            raise CCSError(f"batch {item!r}: expected 'center/batch' or '<store>/incoming/c/b'")
        if root:
            roots.add(root)
        ids.append("/".join(parts))
    screening = cfg.screening
    if cfg.adapt is not None:
        adapt = screening.adapt.model_copy(update={"method": cfg.adapt})
        screening = screening.model_copy(update={"adapt": adapt})
    if cfg.model:
        root, parts = layout.locate(cfg.model, "models")
        if len(parts) not in (1, 2) or not all(parts):
            raise CCSError(f"model {cfg.model!r}: expected 'name[/version]' or a model URI")
        if root:
            roots.add(root)
        update = {"classifier_model": parts[0]}
        update["classifier_version"] = parts[1] if len(parts) == 2 else "latest"
        screening = screening.model_copy(update=update)
    root = None if cfg.store is not None else _one_root(roots, "the batches and model")
    return open_store(cfg.store, root), ids, screening


def check_screen_job(cfg: ScreenJobConfig) -> ScreenJobConfig:
    """A wrong store, model or batch fails here, in one line, before a Ray starts."""
    store, ids, screening = resolve(cfg)
    card = require_model(
        store, screening.classifier_model, screening.classifier_version, "classifier"
    )
    check_adaptation(store, card, screening.adapt.method)
    resolve_batches(store, ids)
    return cfg


def run_screen_job(cfg: ScreenJobConfig) -> ScreenJobResult:
    store, ids, screening = resolve(cfg)
    refs = resolve_batches(store, ids)
    outcomes = screen_batches(store, refs, screening, run_id=cfg.run_id)
    return ScreenJobResult(
        run_id=outcomes[0].run_id if outcomes else cfg.run_id or "",
        store=store.config.uri,
        batches=outcomes,
    )


def summary_line(result: ScreenJobResult) -> str:
    n = sum(b.slides for b in result.batches)
    pos = sum(b.positive for b in result.batches)
    failed = sum(b.failed for b in result.batches)
    inadequate = sum(b.inadequate for b in result.batches)
    rejected = sum(b.rejected for b in result.batches)
    adapted = sorted({b.adaptation for b in result.batches if b.adaptation})
    how = f", adapted ({', '.join(adapted)})" if adapted else ""
    return (
        f"run {result.run_id}{how}: {n} slides in {len(result.batches)} batches screened "
        f"({pos} positive, {inadequate} inadequate, {failed} failed, {rejected} rejected as "
        "not cytology); tables under "
        f"{result.store.rstrip('/')}/results/"
    )
