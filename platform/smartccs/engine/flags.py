"""The screening job's command-line flags: one table for ``python -m jobs.screen`` and
``ccs screen``, kept apart from the engine so that parsing them loads no model code."""

from smartccs.adaptation.config import METHODS
from smartccs.jobrunner import JobFlag

SCREEN_FLAGS = (
    JobFlag("--batch", "batches", "a batch 'center/batch' or its URI (repeatable)", repeat=True),
    JobFlag("--model", "model", "the classifier: 'name[/version]' or its URI"),
    JobFlag("--run-id", "run_id", "name this run (re-using one replaces its rows)"),
    JobFlag(
        "--adapt", "adapt", "test-time adaptation per center (docs/adaptation.md)",
        choices=METHODS,
    ),
    JobFlag(
        "--min-squamous", "screening.adequacy.min_squamous",
        "adequacy minimum for a whole 20 mm preparation (Bethesda: 5000), pro-rated to the "
        "scanned area", type=int,
    ),
)  # fmt: skip
