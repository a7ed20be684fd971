"""Evaluation of screening results against ground truth (docs/evaluation.md).

``truth`` (slide grades from manifests or a file), ``report`` (the metrics, on in-memory Arrow
tables; ``tables`` checks its inputs, ``detection`` scores the kept cells), ``figures`` (PNG
figures), ``render`` (the report folder) and ``run`` (the entry point that reads the committed
result tables: :func:`run_evaluation`).
"""

from smartccs.evaluation.report import (
    Evaluation,
    EvaluationConfig,
    EvaluationError,
    GroupResult,
    evaluate,
    slide_outcomes,
)
from smartccs.evaluation.run import EvaluationJobConfig, run_evaluation, run_evaluation_job
from smartccs.evaluation.truth import TruthError, slide_truth, truth_from_file

__all__ = [
    "Evaluation",
    "EvaluationConfig",
    "EvaluationError",
    "EvaluationJobConfig",
    "GroupResult",
    "TruthError",
    "evaluate",
    "run_evaluation",
    "run_evaluation_job",
    "slide_outcomes",
    "slide_truth",
    "truth_from_file",
]
