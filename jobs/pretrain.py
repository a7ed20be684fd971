"""DINO pretraining of the tile encoder as a Ray job: ``python -m jobs.pretrain --config F``."""

from __future__ import annotations

import sys

from smartccs.jobrunner import run_job
from smartccs.train.pretrain import PretrainConfig, PretrainResult, pretrain


def summary(result: PretrainResult) -> str:
    return f"saved encoder {result.version} after step {result.step} (loss {result.loss:.4f})"


def main(argv: list[str] | None = None) -> int:
    return run_job("jobs.pretrain", __doc__, PretrainConfig, pretrain, summary, argv)


if __name__ == "__main__":
    sys.exit(main())
