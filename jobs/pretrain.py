"""DINO pretraining of the tile encoder as a Ray job:
``python -m jobs.pretrain --config F [--batch C/B ...]`` (no batch named: every committed one)."""

from __future__ import annotations

import sys

from smartccs.jobrunner import JobFlag, run_job
from smartccs.train.pretrain import PretrainConfig, PretrainResult, plan_pretrain, pretrain

FLAGS = (
    JobFlag(
        "--batch", "batches", "a batch 'center/batch' to train on (repeatable; replaces the "
        "config's batches)", repeat=True,
    ),
)  # fmt: skip


def summary(result: PretrainResult) -> str:
    return f"saved encoder {result.version} after step {result.step} (loss {result.loss:.4f})"


def main(argv: list[str] | None = None) -> int:
    return run_job(
        "jobs.pretrain", __doc__, PretrainConfig, pretrain, summary, argv, FLAGS,
        check=plan_pretrain, config_required=True,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
