"""The adapter deployment's logic: centers' adapted classifiers, held per replica.

Serve's model multiplexing routes a center's batches to the replica already holding its
state and evicts the least recently used center past ``centers_per_replica``; this class
loads a center (``load``) and runs its calls one at a time (a center's batches must adapt in
order). Before each call the state is refreshed from the store if another process (the
batch job, a rollback, another replica) moved the center on meanwhile.
"""

from __future__ import annotations

import asyncio

import numpy as np

from smartccs.adaptation.adapter import CenterAdapter
from smartccs.adaptation.config import Method
from smartccs.adaptation.state import DetectorAdaptation
from smartccs.screening.bags import SlideBag
from smartccs.screening.slides import SlideClassifier
from smartccs.service.config import ServiceConfig
from smartccs.service.worker import parse_adapter_key
from smartccs.store import open_store


class AdapterHost:
    def __init__(self, cfg: ServiceConfig):
        self.cfg = cfg
        self.store = open_store(cfg.store)
        self._classifiers: dict[str, SlideClassifier] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def load(self, key: str) -> CenterAdapter:
        """A center's adapter for a pinned classifier version (the multiplexed model id)."""
        center, ref = parse_adapter_key(key)
        model = ref.label
        if model not in self._classifiers:
            self._classifiers[model] = SlideClassifier(self.store, ref)
        return CenterAdapter(self.store, self._classifiers[model], center, self.cfg.screening.adapt)

    def _lock(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    async def prepare(
        self, key: str, adapter: CenterAdapter, batch: str
    ) -> tuple[DetectorAdaptation, bool]:
        async with self._lock(key):
            await asyncio.to_thread(adapter.refresh)
            return adapter.prepare(batch)

    async def adapt(
        self,
        key: str,
        adapter: CenterAdapter,
        batch: str,
        bags: list[SlideBag],
        detector: DetectorAdaptation | None,
        method: Method,
    ) -> tuple[np.ndarray, str, dict[str, float]]:
        async with self._lock(key):
            await asyncio.to_thread(adapter.refresh)
            return await asyncio.to_thread(adapter.adapt, batch, bags, detector, method)
