"""Abnormal-cell detector finetuning as a Ray job:
``python -m jobs.finetune_detector --config jobs/configs/detector-demo.yaml``."""

from __future__ import annotations

import sys

from smartccs.jobrunner import run_job
from smartccs.train.detector import DetectorConfig, DetectorResult, finetune_detector


def summary(result: DetectorResult) -> str:
    aps = ", ".join(f"{k} {v:.3f}" for k, v in result.report.ap.items() if v == v)
    return (
        f"saved detector {result.version} after step {result.step}: held-out mAP@0.5 "
        f"{result.map_abnormal:.3f} over the abnormal classes ({aps})"
    )


def main(argv: list[str] | None = None) -> int:
    return run_job(
        "jobs.finetune_detector", __doc__, DetectorConfig, finetune_detector, summary, argv
    )


if __name__ == "__main__":
    sys.exit(main())
