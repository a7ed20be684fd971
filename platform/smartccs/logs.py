"""Logging that a person can follow: time, level, where, what; quiet third parties."""

import logging
import os


def configure_logging(verbosity: int = 0) -> None:
    level = logging.DEBUG if verbosity > 1 else logging.INFO if verbosity == 1 else logging.WARNING
    level = getattr(logging, os.environ.get("CCS_LOG_LEVEL", ""), level)
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("smartccs").setLevel(min(level, logging.INFO))
    for noisy in ("botocore", "s3fs", "urllib3", "aiobotocore", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
