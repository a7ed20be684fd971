"""The adaptive screening service's Ray Serve deployments (serve/app.py is the door).

    serve run serve/config.yaml            # here, on a local Ray
    serve deploy serve/config.yaml         # onto a running cluster (or infra/rayservice.yaml)

They live in the installed library so that every replica, on any node, can import them.

Three deployments: ``Ingress`` (the FastAPI API: auth, submit, status, results; it imports no
torch), ``Screener`` (workers that take submitted batches from the store's queue and run the
screening engine on them, Ray Data fanning tiles out over the cluster) and ``Adapters``
(centers' adapted classifiers, multiplexed: a center's batches go to the replica that holds its
state). Replica counts and autoscaling are the operator's, in serve/config.yaml only; run from
code without it, each deployment has one replica.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from smartccs.logs import configure_logging
from smartccs.service.api import Service, bind_service, create_app
from smartccs.service.config import ServiceConfig

if TYPE_CHECKING:
    from smartccs.adaptation.state import DetectorAdaptation
    from smartccs.models.refs import ModelRef

api = create_app()


INGRESS_ONGOING = 1024
"""Requests one Ingress replica takes at once. Each is a short store round trip (admission
writes a record create-if-absent), run on FastAPI's thread pool (40 threads): above that a
request waits inside the replica, in order, without back-off. A request beyond this cap waits
in the proxy instead, which retries with growing back-off: with Serve's default of 5, 96 POSTs
took p50 14.7 s while the replica itself took 434 ms; with 128, the 64 POSTs of a 192-POST
burst beyond it waited up to 12 s at the client while the replica answered every POST within
2.3 s. So the cap sits well above any burst a center network sends at once; what a waiting
request holds is its small JSON body."""


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=INGRESS_ONGOING)
@serve.ingress(api)
class Ingress:
    def __init__(self, screener: DeploymentHandle, config: dict[str, Any]):
        configure_logging(1)
        self.wake_screeners = screener.options(method_name="wake")  # built once, not per POST
        bind_service(Service(ServiceConfig.model_validate(config), wake=self._wake))

    def _wake(self) -> None:
        self.wake_screeners.remote()  # a nudge; idle workers also poll the queue


@serve.deployment(ray_actor_options={"num_cpus": 0}, num_replicas=1, max_ongoing_requests=64)
class Screener:
    """Each replica runs ``workers_per_replica`` worker loops in threads; the screening itself
    runs on Ray Data over the cluster."""

    def __init__(self, adapters: DeploymentHandle, config: dict[str, Any]):
        from smartccs.service.worker import RemoteAdapters, Worker  # torch: not in the ingress

        configure_logging(1)
        cfg = ServiceConfig.model_validate(config)

        def adapters_for(classifier: ModelRef, method: str) -> RemoteAdapters:
            return RemoteAdapters(adapters, classifier, method)

        self.workers = [
            Worker(cfg, adapters_for=adapters_for) for _ in range(cfg.workers_per_replica)
        ]
        for i, w in enumerate(self.workers):
            threading.Thread(target=w.run_forever, daemon=True, name=f"worker-{i}").start()

    def wake(self) -> None:
        for w in self.workers:
            w.wakeup.set()


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class Adapters:
    def __init__(self, config: dict[str, Any]):
        from smartccs.service.adapters import AdapterHost  # torch: not in the ingress

        configure_logging(1)
        self.host = AdapterHost(ServiceConfig.model_validate(config))

        async def load(key: str):  # a plain function: the LRU size comes from the config
            return self.host.load(key)

        lru = self.host.cfg.centers_per_replica
        self.get = serve.multiplexed(max_num_models_per_replica=lru)(load)

    async def prepare(self, batch: str) -> tuple[DetectorAdaptation, bool]:
        key = serve.get_multiplexed_model_id()
        return await self.host.prepare(key, await self.get(key), batch)

    async def adapt(self, batch: str, bags: list, detector: DetectorAdaptation | None, method: str):
        key = serve.get_multiplexed_model_id()
        return await self.host.adapt(key, await self.get(key), batch, bags, detector, method)


def build(args: dict[str, Any]) -> serve.Application:
    """The application from serve/config.yaml's ``args`` (a ServiceConfig).

    The args are checked here, so a bad config fails ``serve run`` at once, and handed on as
    given: a dump of the model would mask any secret in it."""
    ServiceConfig.model_validate(args)
    return Ingress.bind(Screener.bind(Adapters.bind(args), args), args)
