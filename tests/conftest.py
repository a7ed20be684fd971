"""Shared fixtures: one local Ray per test session, a moto S3 server over HTTP, a tiny cohort.

Nothing here is a mock: Ray is a real local cluster, S3 is moto's real HTTP server on
127.0.0.1 (standing in for AWS itself, which cannot be reached here), slides are real
pyramidal files read by real OpenSlide.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from moto_buckets import new_s3_store
from ray_head import TRAIN_TIMING_ENV

from smartccs.faults import FAULTS_ENV
from smartccs.store import Store, StoreConfig

pytest_plugins = ["vendor_fixtures", "service_fixtures", "toy_study", "review_fixtures"]

# Property tests stay quick in the default run; HYPOTHESIS_PROFILE=thorough digs deeper.
# No deadline: on a shared 2-core machine a slow example is not a failure.
settings.register_profile("ccs", max_examples=50, deadline=None)
settings.register_profile("thorough", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ccs"))

# before any Ray starts: the shared Ray's runs and the jobs the tests start inherit it
for _name, _value in TRAIN_TIMING_ENV.items():
    os.environ.setdefault(_name, _value)


def pytest_itemcollected(item: pytest.Item) -> None:
    """A test on the shared Ray is marked ``ray`` whether or not its module says so, so that
    ``-m "not ray"`` never starts Ray."""
    if "ray_session" in getattr(item, "fixturenames", ()):
        item.add_marker(pytest.mark.ray)


AGENT_PORT = 52365
"""Ray's dashboard agent HTTP port (ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT)."""


def _port_taken(port: int) -> bool:
    """Whether some process listens on ``port`` on any address (the agent may bind the node IP,
    not loopback, so try to bind it ourselves rather than connect to 127.0.0.1)."""
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def fault_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where tests arm fault points (``smartccs.faults``): every Ray worker of the session has
    it as ``$CCS_FAULTS``; the test process itself does not, so an armed point never kills it."""
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="session")
def ray_session(fault_root: Path) -> Iterator[str]:
    """One Ray instance for the whole session: starting several breaks parallel workers.

    Its dashboard runs too, for the job server (``ray_job_address``); yields that server's URL.
    Ray's job server gives each job's driver the GCS address named in its temp dir's
    ``ray_current_cluster`` (which ``ray start`` writes), else the first it finds among this
    machine's raylet processes: with other Rays here (other test sessions) a job could join one
    of theirs, so this Ray has a temp dir of its own that names it.
    """
    import ray

    temp_dir = tempfile.mkdtemp(prefix="ccs-ray-")  # short: Ray's socket paths fit 107 bytes
    port = _free_port()
    ctx = ray.init(
        num_cpus=4,  # logical CPUs: 2 cores, but actors and tasks must coexist without starving
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        ignore_reinit_error=True,
        configure_logging=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", FAULTS_ENV: str(fault_root)}},
        _temp_dir=temp_dir,
    )
    Path(temp_dir, "ray_current_cluster").write_text(ctx.address_info["gcs_address"])
    yield f"http://127.0.0.1:{port}"
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_job_address(ray_session: str) -> str:
    """The shared Ray's job server (``ray job submit --address``) once it takes jobs.

    Token auth is on, as ``ray.init`` sets it by default. The server hands each job to the head
    node's dashboard agent, whose HTTP port is fixed (52365; ``ray.init`` cannot change it):
    while another Ray on this machine holds that port, ours cannot start and no job can be
    submitted, so the tests that need the job server skip, saying why.
    """
    import time

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_session)
    for _ in range(3):  # the server itself waits 10 s for the agent per request
        try:
            job_id = client.submit_job(entrypoint="true")
            break
        except RuntimeError as exc:
            if "No available agent" not in str(exc):
                raise
    else:
        taken = _port_taken(AGENT_PORT)  # ours is not up, so whoever holds it is another Ray
        if taken:
            pytest.skip(f"another Ray on this machine holds the dashboard agent port {AGENT_PORT}")
        pytest.fail("the shared Ray's dashboard agent did not start: no job server")
    deadline = time.monotonic() + 120
    while not client.get_job_status(job_id).is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
    return ray_session


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1: a real HTTP endpoint that boto3, s3fs and pyarrow use."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_store(s3_endpoint: str) -> Store:
    """A fresh bucket on the moto server."""
    return new_s3_store(s3_endpoint)


@pytest.fixture
def local_store(tmp_path: Path) -> Store:
    return Store(StoreConfig(uri=str(tmp_path / "store")))


@pytest.fixture(params=["local", "s3"])
def any_store(request: pytest.FixtureRequest) -> Store:
    """Runs a test once on a local directory store and once on the moto S3 store."""
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic cohort (2 centers x 2 slides), generated once per session."""
    from smartccs.synth.cohort import generate_cohort

    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(
        out, centers=2, slides_per_center=2, size="tiny", seed=0, workers=2, progress=False
    )
    return out
