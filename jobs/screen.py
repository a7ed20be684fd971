"""Batch screening as a Ray job: committed batches in, the ``slides`` and ``cells`` result
tables out (docs/results.md).

    python -m jobs.screen --batch int-a/b1 --model classifier/latest
    python -m jobs.screen --batch ext-a/b1 --batch ext-a/b2 --adapt smartccs
    python -m jobs.screen --config jobs/configs/screen-demo.yaml        # a whole cohort
"""

from __future__ import annotations

import sys

from smartccs.jobrunner import JobFlag, run_job
from smartccs.screening.job import ScreenJobConfig, run_screen_job, summary_line

FLAGS = (
    JobFlag("--batch", "batches", "a batch id 'center/batch' or URI (repeatable)", repeat=True),
    JobFlag("--model", "model", "the classifier: 'name[/version]' or its URI"),
    JobFlag("--run-id", "run_id", "name this run (re-using one replaces its rows)"),
    JobFlag("--adapt", "adapt", "test-time adaptation: none, smartccs or tent"),
)


def main(argv: list[str] | None = None) -> int:
    return run_job(
        "jobs.screen", __doc__, ScreenJobConfig, run_screen_job, summary_line, argv, flags=FLAGS
    )


if __name__ == "__main__":
    sys.exit(main())
