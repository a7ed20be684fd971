"""Slide classifier (MIL over top-K cells) training as a Ray job:
``python -m jobs.finetune_classifier --config jobs/configs/classifier-demo.yaml [--batch C/B ...]``.

With no batch named (``batches: []``) it learns from every committed batch whose slides all
have a grade and logs the ones it skipped; the splits are checked before Ray starts.
"""

from __future__ import annotations

import sys

from smartccs.jobrunner import JobFlag, run_job
from smartccs.train.classifier import (
    ClassifierConfig,
    ClassifierResult,
    plan_classifier,
    train_classifier,
)

FLAGS = (
    JobFlag(
        "--batch", "batches", "a graded batch 'center/batch' to train on (repeatable; "
        "replaces the config's batches)", repeat=True,
    ),
)  # fmt: skip


def summary(result: ClassifierResult) -> str:
    t = result.test
    if t is None:
        return (
            f"saved classifier {result.version} after step {result.step}: "
            f"{result.operating_point.describe()} (no test split; synthetic)"
        )
    return (
        f"saved classifier {result.version} after step {result.step}: held-out AUC {t.auc:.3f} "
        f"(95% CI {t.auc_ci_low:.3f}-{t.auc_ci_high:.3f}), sensitivity {t.sensitivity:.3f}, "
        f"specificity {t.specificity:.3f} on {t.n_pos + t.n_neg} slides (synthetic)"
    )


def main(argv: list[str] | None = None) -> int:
    return run_job(
        "jobs.finetune_classifier", __doc__, ClassifierConfig, train_classifier, summary, argv,
        FLAGS, check=plan_classifier, config_required=True,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
