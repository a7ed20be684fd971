"""Connecting to Ray the same way from the CLI, the jobs and the tests."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

MIN_LOCAL_CPUS = 4
"""Logical CPUs of a local Ray: planners, reader actors and the driver must all fit, and on a
2-core machine the real count would leave Ray Data's actors waiting on each other."""


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Start a local Ray (embedded default) or join ``address`` (``auto``, ``ray://host:10001``)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"OMP_NUM_THREADS": "1"}
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env={"env_vars": env}, configure_logging=False)
        return
    cpus = num_cpus or max(MIN_LOCAL_CPUS, os.cpu_count() or 1)
    log.info("starting a local Ray with %d logical CPUs", cpus)
    ray.init(
        num_cpus=cpus,
        include_dashboard=False,
        runtime_env={"env_vars": env},
        configure_logging=False,
    )
