"""Connecting to Ray the same way from the CLI, the jobs and the tests, and checking that a
run's actors and tasks can all be placed on it before the run starts."""

from __future__ import annotations

import logging
import os
import signal
from typing import NamedTuple

from smartccs.errors import CCSError

log = logging.getLogger(__name__)

MIN_LOCAL_CPUS = 4
"""Logical CPUs of a local Ray: planners, reader actors and the driver must all fit, and on a
2-core machine the real count would leave Ray Data's actors waiting on each other."""


WORKER_SETUP = "smartccs.raycluster.setup_worker"
"""Run by Ray in every worker process of a job started or joined here, before its first task
(the runtime env's ``worker_process_setup_hook``)."""

_started: dict[str, str] = {}
"""The GCS address of the local Ray this process started, once it has."""


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Start a local Ray (embedded default) or join ``address`` (``auto``, ``ray://host:10001``).

    A local Ray started here is the job's only one: its address goes into ``RAY_ADDRESS`` in
    this process and in every worker process (:func:`setup_worker`), so what Ray looks up on
    its own (Ray Train's ``PlacementGroupCleaner`` asks the state API, which otherwise searches
    the machine and fails with "Found multiple active Ray instances" beside another local Ray)
    and what this process starts find exactly it. Ray's progress output follows ``-v``
    (``smartccs.logs``) in the driver and, through the runtime env, in the workers.
    """
    import ray

    from smartccs.logs import apply_ray_output, ray_output_env

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address == _started.get("address"):
        address = None  # the local Ray this process started and has since shut down
    runtime_env = {
        "env_vars": {"OMP_NUM_THREADS": "1", **ray_output_env()},
        "worker_process_setup_hook": WORKER_SETUP,
    }
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, configure_logging=False)
    else:
        cpus = num_cpus or max(MIN_LOCAL_CPUS, os.cpu_count() or 1)
        log.info("starting a local Ray with %d logical CPUs", cpus)
        ctx = ray.init(
            # a Ray of its own: without "local", Ray joins the last `ray start` on this
            # machine, and fails there because num_cpus is given
            address="local",
            num_cpus=cpus,
            # Ray's default: the dashboard's modules, the state API among them, which Ray
            # Train's PlacementGroupCleaner polls (False leaves it failing every second)
            include_dashboard=None,
            dashboard_host="127.0.0.1",
            dashboard_port=0,  # any free port: 8265 is a cluster's job server (ccs submit)
            runtime_env=runtime_env,
            configure_logging=False,
        )
        _started["address"] = os.environ["RAY_ADDRESS"] = ctx.address_info["gcs_address"]
    apply_ray_output()


def setup_worker() -> None:
    """In each Ray worker process: ``RAY_ADDRESS`` names the cluster the worker belongs to,
    Ray Data's notices that its progress bars are off are hidden (``smartccs.logs``), and
    SIGINT interrupts again. A job started in the background (``make demo &``, ``nohup``)
    hands its workers an ignored SIGINT; Ray cancels tasks with SIGINT (a stream stopped
    early), and with it ignored prints "TypeError: 'Handlers' object is not callable"."""
    import ray

    if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL):
        signal.signal(signal.SIGINT, signal.default_int_handler)

    from smartccs.logs import hide_ray_data_notices

    try:
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    except Exception as exc:  # never stop a worker from starting over this
        log.warning("cannot tell this worker's Ray address (%s)", exc)
    hide_ray_data_notices()


class ClusterTooSmallError(CCSError):
    """A run whose actors and tasks cannot all be placed at once: Ray would start what fits and
    wait for the rest for ever, so the run stops before it starts, saying which settings."""


class Demand(NamedTuple):
    """``count`` actors or tasks of one kind that must be placed at once, ``one`` each."""

    label: str  # the settings behind it, as a user would change them
    one: dict[str, float]
    count: int = 1


_KINDS = ("CPU", "GPU")
_EPS = 1e-9


def cluster_nodes(units: int) -> tuple[list[dict[str, float]], bool] | None:
    """Each node's CPUs and GPUs a run can count on, and whether they come from the autoscaler.

    With an autoscaler config (``ray up``, KubeRay) the nodes are every node group at its
    ``max_count`` (up to ``units`` of each: no run places more), so a cluster that scales from
    zero or has not finished starting is judged on what it can become, not on what it has;
    None when a group has no upper bound, as then anything may fit, or when the config cannot be
    read. Without one, the alive nodes: a local Ray or a fixed cluster gains none on its own.
    """
    import ray

    try:
        from ray._private.state import state  # what Ray Data and Train read it with (2.60)

        config = state.get_cluster_config()
    except Exception as exc:  # a private API: if it moves, never fail a run on a guess
        log.warning("cannot tell whether the cluster autoscales (%s): not checked", exc)
        return None
    if config is not None and config.node_group_configs:
        nodes = []
        for group in config.node_group_configs:
            shape = {k: float(group.resources.get(k, 0)) for k in _KINDS}
            if group.max_count == 0 or not any(shape.values()):
                continue
            if group.max_count < 0:
                return None
            nodes += [dict(shape) for _ in range(min(group.max_count, units))]
        return nodes, True
    alive = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    return [{k: float(r.get(k, 0.0)) for k in _KINDS} for r in alive], False


def _fits(one: dict[str, float], free: dict[str, float]) -> bool:
    return all(one.get(k, 0.0) <= free.get(k, 0.0) + _EPS for k in _KINDS)


def unplaced(demands: list[Demand], nodes: list[dict[str, float]]) -> Demand | None:
    """The first demand that first-fit, largest first, cannot place on ``nodes``; None if all
    fit. Ray packs actors and tasks much the same way, one node at a time."""
    free = [dict(n) for n in nodes]
    units = [d for d in demands for _ in range(d.count)]
    for d in sorted(units, key=lambda d: tuple(-d.one.get(k, 0.0) for k in reversed(_KINDS))):
        node = next((f for f in free if _fits(d.one, f)), None)
        if node is None:
            return d
        for k in _KINDS:
            node[k] = node.get(k, 0.0) - d.one.get(k, 0.0)
    return None


def _n(amount: float, kind: str) -> str:
    return f"{amount:g} {kind}" + ("" if amount == 1 else "s")


def _amount(resources: dict[str, float]) -> str:
    return " and ".join(_n(resources.get(k, 0.0), k) for k in _KINDS if resources.get(k))


def placement_error(
    what: str, demands: list[Demand], nodes: list[dict[str, float]], hint: str, autoscaled: bool
) -> str | None:
    """Why ``demands`` cannot all run at once on ``nodes``, in one line ending in ``hint``; None
    when they can."""
    short = unplaced(demands, nodes)
    if short is None:
        return None
    has = "can grow to" if autoscaled else "has"
    if not any(_fits(short.one, n) for n in nodes):
        biggest = {k: max((n.get(k, 0.0) for n in nodes), default=0.0) for k in _KINDS}
        return (
            f"{what}: one of {short.label} needs {_amount(short.one)} on one node but the "
            f"nodes the cluster {has} hold at most {_amount(biggest) or 'none'} each; {hint}"
        )
    need = {k: sum(d.one.get(k, 0.0) * d.count for d in demands) for k in _KINDS}
    total = {k: sum(n.get(k, 0.0) for n in nodes) for k in _KINDS}
    parts = ", ".join(d.label for d in demands)
    over = [k for k in _KINDS if need[k] > total[k] + _EPS]
    if over:
        k = over[0]
        return (
            f"{what} needs {_n(need[k], k)} at once ({parts}) but the cluster {has} "
            f"{_n(total[k], k)}; {hint}"
        )
    return (
        f"{what} needs {_amount(need)} at once ({parts}): the cluster {has} that much in all, "
        f"but split over its nodes not every actor and task fits; {hint}"
    )


def check_placement(what: str, demands: list[Demand], hint: str) -> None:
    """Raise :class:`ClusterTooSmallError` when ``demands`` cannot all be placed at once on the
    cluster (see :func:`cluster_nodes` for which nodes count; Ray is started the doors' way if
    it is not yet). Only this run's own demands are weighed: other jobs holding resources make
    it wait, as they release them, which is not a hang."""
    import ray

    if not ray.is_initialized():
        init_ray()
    found = cluster_nodes(sum(d.count for d in demands))
    if found is None:
        log.debug("%s: the autoscaler has an unbounded node group, nothing to check", what)
        return
    nodes, autoscaled = found
    message = placement_error(what, demands, nodes, hint, autoscaled)
    if message:
        raise ClusterTooSmallError(message)
