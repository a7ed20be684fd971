"""The ``--store`` flag every ``ccs`` command takes, defined once for cli.py and the command
modules it registers (smartccs.models.commands, smartccs.results.review_commands)."""

from __future__ import annotations

import argparse

from smartccs.store import DEFAULT_STORE_URI


def add_store_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        default=None,
        help=f"store URI: local path or s3://bucket/prefix (default: $CCS_STORE or "
        f"{DEFAULT_STORE_URI}); S3 endpoint and keys from the AWS_* variables",
    )
