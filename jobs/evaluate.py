"""Evaluation of committed screening results against ground truth as a Ray job:
``python -m jobs.evaluate --config jobs/configs/evaluate-demo.yaml``.

Runs on the driver (no Ray tasks): it reads the result tables, computes the metrics and writes
the report folder (``out``) on the driver's disk; see docs/evaluation.md.
"""

from __future__ import annotations

import sys

from smartccs.evaluation.run import (
    EvaluationJobConfig,
    EvaluationJobResult,
    run_evaluation_job,
    summary_line,
)
from smartccs.jobrunner import run_job


def summary(result: EvaluationJobResult) -> str:
    return summary_line(result.evaluation, result.report)


def main(argv: list[str] | None = None) -> int:
    return run_job("jobs.evaluate", __doc__, EvaluationJobConfig, run_evaluation_job, summary, argv)


if __name__ == "__main__":
    sys.exit(main())
