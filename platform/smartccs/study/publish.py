"""What the study leaves at its store's top level for the other doors: the w/ P&A arm.

Each arm screens in a store of its own (``runs/<study>/arms/<arm>/``); after screening, the
published arm's classifier becomes a version of ``models/classifier`` (the name the README,
``serve/config.yaml`` and ``jobs/configs/screen-*.yaml`` use; ``LATEST`` points at it) and its
committed result partitions are copied under ``results/``, where the analyst's SQL and
``ccs evaluate`` read. Nothing committed is modified: the classifier is a new version whose card
says where it came from (``head.published_from``), the partitions are copied with their commit
records, and a batch that already has results at the top level (a re-run of the study, or a
user's own screening since) keeps them. A re-run publishes nothing twice.
"""

from __future__ import annotations

import logging

from pydantic import BaseModel

from smartccs.models.artifacts import list_versions, load_card, load_model, save_model
from smartccs.results.copy import copy_batch_results
from smartccs.results.tables import read_commit
from smartccs.store import Store

log = logging.getLogger(__name__)

PUBLISHED_ARM = "pa"
"""The arm whose models and results the study publishes: w/ P&A, the whole method."""
PUBLISHED_MODEL = "classifier"
FROM_KEY = "published_from"
"""The card's ``head`` entry naming the version a published classifier is a copy of."""


class Published(BaseModel):
    classifier: str
    """``classifier/<version>``: a copy of the arm's classifier (it pins the same detector and
    encoder, which are in the store already)."""
    partitions: int
    """Batches whose results were copied now; 0 when a run before had copied them."""


def publish_model(store: Store, name: str, version: str, as_name: str = PUBLISHED_MODEL) -> str:
    """A version of ``as_name`` with ``name/version``'s weights and card (its pins unchanged),
    made once: an existing copy of that very version is returned as is."""
    source = {"name": name, "version": version}
    for v in reversed(list_versions(store, as_name)):
        if load_card(store, as_name, v).head.get(FROM_KEY) == source:
            return v
    card, weights = load_model(store, name, version)
    copy = card.model_copy(
        update={
            "name": as_name,
            "version": None,
            "weights_sha256": None,
            "created_at": "",
            "head": card.head | {FROM_KEY: source},
        }
    )
    return save_model(store, copy, weights)


def publish_arm(
    store: Store, arm_store: Store, classifier: tuple[str, str], batches: list[tuple[str, str]]
) -> Published:
    """Publish the arm screened in ``arm_store`` with ``classifier`` (name, version) at
    ``store``'s top level: the classifier as ``models/classifier``, the results of ``batches``
    ((center, batch) pairs) under ``results/``."""
    version = publish_model(store, *classifier)
    copied = 0
    for center, batch in batches:
        if read_commit(arm_store, center, batch) is None:
            log.warning("%s/%s has no committed results in %s: not published", center, batch,
                        arm_store.uri())  # fmt: skip
            continue
        copied += copy_batch_results(arm_store, store, center, batch)
    return Published(classifier=f"{PUBLISHED_MODEL}/{version}", partitions=copied)
