"""Per-center S3 policies (smartccs.deploy.policy, infra/center-policies.json).

The main test runs the generated policies against moto's S3 with IAM enforced, over real HTTP:
a moto server in its own process started with ``INITIAL_NO_AUTH_ACTION_COUNT=3`` (moto checks
every request's signature and evaluates the caller's IAM policies once that many requests have
passed; the three are spent creating an admin). The server runs apart from the suite's shared
moto server because that setting is process-wide in moto.

What moto does not evaluate, and is therefore checked on the document instead: policy
conditions other than ``StringEquals`` are ignored, so the ``s3:prefix`` condition that confines
a center's ListBucket to its own prefixes is asserted structurally
(``test_listing_is_confined_to_the_centers_own_prefixes``), not over HTTP.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError
from cli import assert_one_line_error, run_ccs
from slide_factory import write_disc_slide

from smartccs import layout
from smartccs.deploy.policy import (
    MANAGED_POLICY_MAX_CHARS,
    PolicyError,
    StoreLocation,
    center_policies,
    center_policy,
    policy_chars,
    read_centers,
)
from smartccs.results.schema import TABLES
from smartccs.store import S3Options, Store, StoreConfig
from smartccs.upload import upload_batch

REPO = Path(__file__).resolve().parents[1]
BUCKET = "ccs-policy-test"
ROOT = f"s3://{BUCKET}/store"
REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def iam_endpoint() -> Iterator[str]:
    """A moto server that enforces IAM from its 4th request on."""
    port = _free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("the IAM-enforcing moto server did not start")
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def _keys(endpoint: str, key_id: str, secret: str) -> dict[str, str]:
    return {
        "endpoint_url": endpoint,
        "region_name": REGION,
        "aws_access_key_id": key_id,
        "aws_secret_access_key": secret,
    }


def _user(iam, name: str, policy: dict) -> tuple[str, str]:
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName="smartccs", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


@pytest.fixture(scope="module")
def network(iam_endpoint: str) -> dict[str, dict[str, str]]:
    """An admin, the platform and two centers as IAM users with the generated policies.

    Returns each identity's client kwargs. The first three requests (unauthenticated) make the
    admin; from then on every request is signed and checked against IAM."""
    boot = boto3.client("iam", **_keys(iam_endpoint, "bootstrap", "bootstrap"))
    admin = _user(
        boot,
        "admin",
        {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
        },
    )
    admin_kw = _keys(iam_endpoint, *admin)
    boto3.client("s3", **admin_kw).create_bucket(Bucket=BUCKET)
    iam = boto3.client("iam", **admin_kw)
    bundle = center_policies(StoreLocation.from_uri(ROOT), ["center-a", "center-b"])
    ids = {
        "admin": admin_kw,
        "platform": _keys(iam_endpoint, *_user(iam, "platform", bundle["platform"])),
    }
    for center, policy in bundle["centers"].items():
        ids[center] = _keys(iam_endpoint, *_user(iam, center, policy))
    return ids


def _store(kw: dict[str, str]) -> Store:
    return Store(
        StoreConfig(
            uri=ROOT,
            s3=S3Options(
                endpoint_url=kw["endpoint_url"],
                region=REGION,
                access_key_id=kw["aws_access_key_id"],
                secret_access_key=kw["aws_secret_access_key"],
            ),
        )
    )


def _denied(call, *args, **kwargs) -> bool:
    try:
        call(*args, **kwargs)
    except ClientError as exc:
        assert exc.response["Error"]["Code"] == "AccessDenied", exc.response
        return True
    return False


def test_policies_confine_each_center_to_its_own_prefixes(network, tmp_path: Path):
    # The platform publishes a result object for each center (any bytes: this is about access).
    platform = boto3.client("s3", **network["platform"])
    result_keys, commit_keys = {}, {}
    for center in ("center-a", "center-b"):
        key = f"store/{layout.results('slides', center, 'b1')}/part-0.parquet"
        platform.put_object(Bucket=BUCKET, Key=key, Body=center.encode())
        result_keys[center] = key
        key = f"store/{layout.result_commit('slides', center, 'b1')}/{layout.COMMIT_MARKER}"
        platform.put_object(Bucket=BUCKET, Key=key, Body=center.encode())
        commit_keys[center] = key

    # center-a uploads a real batch with `ccs upload`'s library call, as its own IAM user.
    scans = tmp_path / "scans"
    scans.mkdir()
    write_disc_slide(scans / "s1.svs", fmt="svs", mpp=0.25)
    ref = upload_batch(scans, center="center-a", batch="b1", store=_store(network["center-a"]),
                       progress=False)  # fmt: skip
    assert ref.manifest.center == "center-a"
    marker = f"store/{layout.incoming('center-a', 'b1')}/{layout.COMMIT_MARKER}"
    assert platform.head_object(Bucket=BUCKET, Key=marker)["ContentLength"] > 0

    a = boto3.client("s3", **network["center-a"])
    b = boto3.client("s3", **network["center-b"])
    # its own results: readable; the other center's: not
    body = a.get_object(Bucket=BUCKET, Key=result_keys["center-a"])["Body"].read()
    assert body == b"center-a"
    assert _denied(a.get_object, Bucket=BUCKET, Key=result_keys["center-b"])
    assert _denied(b.get_object, Bucket=BUCKET, Key=result_keys["center-a"])
    # and so are the commit records of its results
    assert a.get_object(Bucket=BUCKET, Key=commit_keys["center-a"])["Body"].read() == b"center-a"
    assert _denied(a.get_object, Bucket=BUCKET, Key=commit_keys["center-b"])
    # center-b can neither read nor write center-a's incoming prefix
    slide = f"store/{layout.incoming('center-a', 'b1')}/s1.svs"
    assert _denied(b.get_object, Bucket=BUCKET, Key=slide)
    assert _denied(b.put_object, Bucket=BUCKET, Key=slide, Body=b"x")
    assert _denied(b.put_object, Bucket=BUCKET, Key="store/incoming/center-a/b2/s.svs", Body=b"x")
    assert _denied(b.delete_object, Bucket=BUCKET, Key=slide)
    # while center-b writes its own incoming prefix
    b.put_object(Bucket=BUCKET, Key="store/incoming/center-b/b9/x.svs", Body=b"x")
    # no center writes results, models or runs, nor anything outside the store root
    for key in (
        f"store/{layout.results('slides', 'center-a', 'b2')}/part-0.parquet",
        f"store/{layout.model('classifier', 'v1')}/card.json",
        "store/runs/service/batches/x.json",
        "elsewhere/incoming/center-a/b1/x",
    ):
        assert _denied(a.put_object, Bucket=BUCKET, Key=key, Body=b"x"), key
    assert _denied(a.get_object, Bucket=BUCKET, Key="store/runs/service/batches/x.json")
    # a committed batch's marker cannot be deleted, even by its own center
    assert _denied(a.delete_object, Bucket=BUCKET, Key=marker)
    assert platform.head_object(Bucket=BUCKET, Key=marker)


def test_listing_is_confined_to_the_centers_own_prefixes():
    """Structural (moto ignores StringLike conditions): the only ListBucket grant carries an
    ``s3:prefix`` condition naming the center's incoming and result prefixes, and nothing
    broader; every object grant stays under them."""
    store = StoreLocation.from_uri(ROOT)
    policy = center_policy(store, "center-a")
    listing = [s for s in policy["Statement"] if "s3:ListBucket" in str(s["Action"])]
    assert len(listing) == 1
    [stmt] = listing
    assert stmt["Effect"] == "Allow" and stmt["Resource"] == f"arn:aws:s3:::{BUCKET}"
    prefixes = stmt["Condition"]["StringLike"]["s3:prefix"]
    allowed_roots = ["store/incoming/center-a"] + [
        f"store/results/{tree}{t}/center=center-a" for tree in ("", "_commits/") for t in TABLES
    ]
    for p in prefixes:
        assert any(p in (r, r + "/*") for r in allowed_roots), p
    assert {p.removesuffix("/*") for p in prefixes} == set(allowed_roots)
    for s in policy["Statement"]:
        if s["Effect"] != "Allow" or s is stmt:
            continue
        resources = s["Resource"] if isinstance(s["Resource"], list) else [s["Resource"]]
        for r in resources:
            assert any(r.startswith(f"arn:aws:s3:::{BUCKET}/{root}/") for root in allowed_roots), r


def test_prefixes_follow_the_store_layout():
    store = StoreLocation.from_uri("s3://bkt")  # a store at the bucket's root
    text = json.dumps(center_policy(store, "c1"))
    assert f"arn:aws:s3:::bkt/{layout.incoming('c1', 'x').removesuffix('x')}*" in text
    for t in TABLES:
        for where in (layout.results, layout.result_commit):
            assert f"arn:aws:s3:::bkt/{where(t, 'c1', 'x').removesuffix('batch=x')}*" in text


def test_a_network_of_48_centers_fits_iams_limits_and_rejects_bad_lists(tmp_path: Path):
    centers = [f"center-{i:02d}" for i in range(1, 49)]
    bundle = center_policies(StoreLocation.from_uri("s3://smartccs-prod/store"), centers)
    assert list(bundle["centers"]) == centers
    assert max(policy_chars(p) for p in bundle["centers"].values()) < MANAGED_POLICY_MAX_CHARS
    # no policy names another center
    for c, p in bundle["centers"].items():
        others = [o for o in centers if o != c]
        text = json.dumps(p)
        assert not any(f"/{o}/" in text or f"={o}/" in text for o in others), c
    with pytest.raises(PolicyError, match="more than once"):
        center_policies(StoreLocation.from_uri(ROOT), ["a", "b", "a"])
    with pytest.raises(PolicyError, match="not an s3"):
        StoreLocation.from_uri("./ccs-data")
    bad = tmp_path / "centers.txt"
    bad.write_text("ok-center\n../etc\n")
    with pytest.raises(PolicyError, match=r"centers.txt:2"):
        read_centers(bad)


def test_committed_example_is_what_the_command_generates(tmp_path: Path):
    """infra/center-policies.json is the output of the documented command, byte for byte."""
    out = tmp_path / "policies.json"
    res = run_ccs(
        "deploy", "policy", "--store", "s3://smartccs-prod/store",
        "--centers", str(REPO / "infra/centers.example.txt"), "--out", str(out),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    committed = (REPO / "infra/center-policies.json").read_text()
    assert out.read_text() == committed
    doc = json.loads(committed)
    assert len(doc["centers"]) == 48
    assert doc["store"] == "s3://smartccs-prod/store"
    bad = run_ccs("deploy", "policy", "--store", "./local", "--centers", str(out))
    assert_one_line_error(bad, "not an s3://")
