"""Shared fixtures: one local Ray per test session, a moto S3 server over HTTP, a tiny cohort.

Nothing here is a mock: Ray is a real local cluster, S3 is moto's real HTTP server on
127.0.0.1 (standing in for AWS itself, which cannot be reached here), slides are real
pyramidal files read by real OpenSlide.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from smartccs.store import S3Options, Store, StoreConfig

pytest_plugins = ["vendor_fixtures"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One Ray instance for the whole session: starting several breaks parallel workers."""
    import ray

    ray.init(
        num_cpus=4,  # logical CPUs: 2 cores, but actors and tasks must coexist without starving
        include_dashboard=False,
        ignore_reinit_error=True,
        configure_logging=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
    )
    yield
    ray.shutdown()


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
    """A fresh bucket on the moto server, as a Store with the endpoint passed explicitly."""
    import boto3

    bucket = f"ccs-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    return Store(
        StoreConfig(
            uri=f"s3://{bucket}/store",
            s3=S3Options(
                endpoint_url=s3_endpoint,
                region="us-east-1",
                access_key_id="testing",
                secret_access_key="testing",
            ),
        )
    )


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
