"""Buckets on the session's moto S3 server (real HTTP on 127.0.0.1), as stores."""

from __future__ import annotations

import uuid

from smartccs.store import S3Options, Store, StoreConfig


def moto_s3(s3_endpoint: str) -> dict[str, str]:
    """The moto server's connection settings as plain values: a Serve app's arguments carry
    them so (a dumped ``S3Options`` would mask the secret)."""
    return {
        "endpoint_url": s3_endpoint,
        "region": "us-east-1",
        "access_key_id": "testing",
        "secret_access_key": "testing",
    }


def new_s3_store(s3_endpoint: str, prefix: str = "ccs") -> Store:
    """A fresh bucket on the moto server, as a Store with the endpoint passed explicitly."""
    import boto3

    bucket = f"{prefix}-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    return Store(StoreConfig(uri=f"s3://{bucket}/store", s3=S3Options(**moto_s3(s3_endpoint))))
