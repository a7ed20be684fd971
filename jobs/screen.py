"""Batch screening as a Ray job: committed batches in, the ``slides`` and ``cells`` result
tables out (docs/results.md).

    python -m jobs.screen --batch int-a/b1 --model classifier/latest
    python -m jobs.screen --batch ext-a/b1 --batch ext-a/b2 --adapt smartccs
    python -m jobs.screen --config jobs/configs/screen-demo.yaml        # a whole cohort
"""

from __future__ import annotations

import sys

from smartccs.engine.flags import SCREEN_FLAGS
from smartccs.engine.job import ScreenJobConfig, check_screen_job, run_screen_job, summary_line
from smartccs.jobrunner import run_job


def main(argv: list[str] | None = None) -> int:
    return run_job(
        "jobs.screen", __doc__, ScreenJobConfig, run_screen_job, summary_line, argv,
        SCREEN_FLAGS, check=check_screen_job,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
