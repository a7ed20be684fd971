"""Per-center S3 access for a store on AWS S3 (docs/store.md; contracts: docs/architecture.md).

A screening center writes only under ``incoming/<center>/`` (its uploads) and reads only that
prefix and its own result partitions, ``results/<table>/center=<center>/``, with their commit
records, ``results/_commits/<table>/center=<center>/``; it cannot list,
read or write another center's objects, the models or the runs. The platform's own role reads
and writes the whole store. Each center gets its own identity policy (for its IAM user or
role): one document per center stays far below IAM's 6,144-character limit whatever the size of
the network, where a single bucket policy for 48 centers would pass S3's 20 KB limit.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from smartccs import layout
from smartccs.errors import CCSError
from smartccs.ids import validate_id
from smartccs.results.schema import TABLES

POLICY_VERSION = "2012-10-17"
MANAGED_POLICY_MAX_CHARS = 6144
"""IAM's limit on a customer managed policy, counted without whitespace."""

OBJECT_ACTIONS = (
    # what `ccs upload` does inside a center's prefix (smartccs.upload), and the platform
    # inside the whole store
    "s3:PutObject",  # also covers the multipart upload calls of large slides
    "s3:GetObject",  # the upload reads its lease and checks the commit marker
    "s3:DeleteObject",  # a crashed upload's leftovers and the lease are removed
    "s3:AbortMultipartUpload",
    "s3:ListMultipartUploadParts",
)


class PolicyError(CCSError):
    """A store URI or center list that no policy can be generated from."""


@dataclass(frozen=True)
class StoreLocation:
    """The bucket and key prefix of an ``s3://bucket/prefix`` store root."""

    bucket: str
    prefix: str = ""
    partition: str = "aws"

    @classmethod
    def from_uri(cls, uri: str, partition: str = "aws") -> StoreLocation:
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise PolicyError(f"{uri!r} is not an s3://bucket/prefix store URI")
        return cls(parsed.netloc, parsed.path.strip("/"), partition)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    @property
    def bucket_arn(self) -> str:
        return f"arn:{self.partition}:s3:::{self.bucket}"

    def key(self, relative: str) -> str:
        """A key (or key pattern) under the store root."""
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def object_arn(self, relative: str) -> str:
        return f"{self.bucket_arn}/{self.key(relative)}"


def center_prefixes(center: str) -> tuple[str, list[str]]:
    """The center's upload prefix and its result prefixes (partitions and their commit
    records), relative to the store root.

    Built from the same layout as the writers (``layout.incoming``, ``layout.results``,
    ``layout.result_commit``) by cutting the batch level off, so the policy follows the layout
    if the layout changes."""
    center = validate_id(center, "center")
    incoming = layout.incoming(center, "b").rpartition("/")[0] + "/"
    results = [
        where(t, center, "b").rpartition("/")[0] + "/"
        for where in (layout.results, layout.result_commit)
        for t in TABLES
    ]
    return incoming, results


def center_policy(store: StoreLocation, center: str) -> dict[str, Any]:
    """The identity policy of one center: write its incoming/ prefix, read its results."""
    incoming, results = center_prefixes(center)
    listable = [store.key(incoming.rstrip("/")), store.key(incoming + "*")]
    for prefix in results:
        listable += [store.key(prefix.rstrip("/")), store.key(prefix + "*")]
    return {
        "Version": POLICY_VERSION,
        "Statement": [
            {
                "Sid": "ListOwnPrefixes",
                "Effect": "Allow",
                "Action": "s3:ListBucket",
                "Resource": store.bucket_arn,
                "Condition": {"StringLike": {"s3:prefix": listable}},
            },
            {
                "Sid": "UploadOwnBatches",
                "Effect": "Allow",
                "Action": list(OBJECT_ACTIONS),
                "Resource": store.object_arn(incoming + "*"),
            },
            {
                "Sid": "ReadOwnResults",
                "Effect": "Allow",
                "Action": "s3:GetObject",
                "Resource": [store.object_arn(prefix + "*") for prefix in results],
            },
            {
                # a committed batch is final (docs/store.md): its marker is never removed
                "Sid": "KeepCommitMarkers",
                "Effect": "Deny",
                "Action": "s3:DeleteObject",
                "Resource": store.object_arn(f"{incoming}*/{layout.COMMIT_MARKER}"),
            },
        ],
    }


def platform_policy(store: StoreLocation) -> dict[str, Any]:
    """The platform's role (cluster nodes, the service): everything under the store root."""
    listing: dict[str, Any] = {
        "Sid": "ListStore",
        "Effect": "Allow",
        "Action": "s3:ListBucket",
        "Resource": store.bucket_arn,
    }
    if store.prefix:
        listing["Condition"] = {"StringLike": {"s3:prefix": [store.prefix, store.key("*")]}}
    return {
        "Version": POLICY_VERSION,
        "Statement": [
            listing,
            {
                "Sid": "ReadWriteStore",
                "Effect": "Allow",
                "Action": list(OBJECT_ACTIONS),
                "Resource": store.object_arn("*"),
            },
        ],
    }


def policy_chars(policy: dict[str, Any]) -> int:
    """The policy's size as IAM counts it (no whitespace)."""
    return len(json.dumps(policy, separators=(",", ":")))


def center_policies(store: StoreLocation, centers: Iterable[str]) -> dict[str, Any]:
    """Every center's policy and the platform's, as one JSON-ready document.

    Refuses a duplicate center (two entries would silently share one identity) and any policy
    IAM would reject for its size."""
    names = list(centers)
    if not names:
        raise PolicyError("no centers given")
    dupes = sorted({c for c in names if names.count(c) > 1})
    if dupes:
        raise PolicyError(f"center listed more than once: {', '.join(dupes)}")
    policies = {c: center_policy(store, c) for c in names}
    for name, doc in [*policies.items(), ("platform", platform_policy(store))]:
        if policy_chars(doc) > MANAGED_POLICY_MAX_CHARS:
            raise PolicyError(
                f"the policy for {name} has {policy_chars(doc)} characters; "
                f"IAM allows {MANAGED_POLICY_MAX_CHARS}"
            )
    return {
        "store": store.uri,
        "platform": platform_policy(store),
        "centers": policies,
    }


def read_centers(path: str | Path) -> list[str]:
    """Center ids from a text file, one per line; blank lines and ``#`` comments are skipped."""
    centers = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            centers.append(validate_id(text, "center"))
        except CCSError as exc:
            raise PolicyError(f"{path}:{n}: {exc}") from None
    return centers
