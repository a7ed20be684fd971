"""Abnormal-cell detector finetuning as a Ray job:
``python -m jobs.finetune_detector --config jobs/configs/detector-demo.yaml [--batch C/B ...]``.

With no batch named (``batches: []``) it learns from every committed batch with cell
annotations and logs the ones it skipped; the splits are checked before Ray starts.
"""

from __future__ import annotations

import sys

from smartccs.jobrunner import JobFlag, run_job
from smartccs.train.detector import DetectorConfig, DetectorResult, finetune_detector, plan_detector

FLAGS = (
    JobFlag(
        "--batch", "batches", "an annotated batch 'center/batch' to train on (repeatable; "
        "replaces the config's batches)", repeat=True,
    ),
)  # fmt: skip


def summary(result: DetectorResult) -> str:
    aps = ", ".join(f"{k} {v:.3f}" for k, v in result.report.ap.items() if v == v)
    return (
        f"saved detector {result.version} after step {result.step}: held-out mAP@0.5 "
        f"{result.map_abnormal:.3f} over the abnormal classes ({aps})"
    )


def main(argv: list[str] | None = None) -> int:
    return run_job(
        "jobs.finetune_detector", __doc__, DetectorConfig, finetune_detector, summary, argv,
        FLAGS, check=plan_detector, config_required=True,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
