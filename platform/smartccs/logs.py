"""Logging that a person can follow: time, level, where, what; quiet third parties.

Every job shows its own progress (training: a line every ``log_every`` steps with step, loss,
throughput and ETA; screening: slides done of the total), so Ray's own progress output is off
by default: Ray Data's "Execution plan of Dataset" and "Dataset ... execution finished" lines,
its operator tables and "Total Progress" lines (``logging_progress.py``, when stdout is not a
terminal), its tqdm "Running Dataset" bars, and Ray Train's per-report lines. ``-v`` (``ccs -v``,
``python -m jobs.<name> -v``; or ``CCS_LOG_LEVEL=INFO``) brings them back.

One place decides it: :func:`configure_logging` records the verbosity, and where a job starts or
joins Ray (``smartccs.raycluster.init_ray``) it is applied to the driver
(:func:`apply_ray_output`) and, through the job's runtime env, to every worker process
(:func:`ray_output_env`, read by Ray Data when it is imported there); Ray Train's controller and
workers take :func:`ray_train_log_level` from ``smartccs.train.loop.fit``. Ray 2.60's knobs, read
in the installed source: ``DataContext.enable_progress_bars`` (default from
``RAY_DATA_DISABLE_PROGRESS_BARS``), ``DataContext.print_on_execution_start``, the ``ray.data``
logger's level (``RAY_DATA_LOG_LEVEL``, applied by ``ray.data._internal.logging``), and
``ray.train.LoggingConfig.log_level``. A dataset carries the driver's ``DataContext`` to the
actors that run it (Ray Train's ``SplitCoordinator``), so the driver's settings reach them too.
"""

from __future__ import annotations

import logging
import os
import time

_ray_verbose = False
"""Whether Ray's own progress output is on: set by :func:`configure_logging` (``-v``)."""

RAY_VERBOSE_ENV = "CCS_RAY_VERBOSE"
"""``1`` in a job's Ray worker processes when the job runs with ``-v`` (:func:`ray_output_env`)."""

RAY_DATA_NOTICES = ("Progress bars disabled", "Progress bars for operators disabled")
"""Ray Data's own warnings that its progress bars are off (how to turn them back on its way,
not ours: ``-v``): hidden, as the bars are."""


def configure_logging(verbosity: int = 0) -> None:
    """smartccs at INFO (DEBUG with ``-vv``), third parties at WARNING (INFO with ``-v``), and
    Ray's progress output on only with ``-v`` (see the module docstring)."""
    global _ray_verbose
    level = logging.DEBUG if verbosity > 1 else logging.INFO if verbosity == 1 else logging.WARNING
    level = getattr(logging, os.environ.get("CCS_LOG_LEVEL", ""), level)
    _ray_verbose = level <= logging.INFO
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("smartccs").setLevel(min(level, logging.INFO))
    for noisy in ("botocore", "s3fs", "urllib3", "aiobotocore", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def ray_verbose() -> bool:
    """Whether Ray's own progress output is wanted (``-v``); off unless configured so."""
    return _ray_verbose


def _ray_data_log_level(verbose: bool) -> str:
    # a level the user set for Ray Data stands; else Ray's own (DEBUG, its console handler
    # prints INFO) with -v, WARNING without
    return os.environ.get("RAY_DATA_LOG_LEVEL") or ("DEBUG" if verbose else "WARNING")


def ray_output_env(verbose: bool | None = None) -> dict[str, str]:
    """Environment variables that set Ray Data's output in Ray's worker processes (the job's
    runtime env), read when Ray Data is imported there."""
    verbose = ray_verbose() if verbose is None else verbose
    return {
        "RAY_DATA_LOG_LEVEL": _ray_data_log_level(verbose),
        "RAY_DATA_DISABLE_PROGRESS_BARS": "0" if verbose else "1",
        RAY_VERBOSE_ENV: "1" if verbose else "0",
    }


def ray_train_log_level(verbose: bool | None = None) -> str:
    """Ray Train's ``LoggingConfig.log_level``: its own INFO lines (worker group started,
    "Reporting training result ...") only with ``-v``."""
    return "INFO" if (ray_verbose() if verbose is None else verbose) else "WARNING"


def apply_ray_train_worker_output() -> None:
    """In a Ray Train worker: its line per report ("Reporting training result 3:
    TrainingReport(...)") only with ``-v``. Ray 2.60 logs it on a logger named after its file
    (``ray/train/v2/_internal/execution/context.py``: ``getLogger(__file__)``), which
    ``LoggingConfig.log_level`` does not reach."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # moved in another Ray: its line stays
        return
    verbose = os.environ.get(RAY_VERBOSE_ENV) == "1"
    logging.getLogger(context.__file__).setLevel(logging.INFO if verbose else logging.WARNING)


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def hide_ray_data_notices() -> None:
    """Drop :data:`RAY_DATA_NOTICES` in this process (without importing Ray Data)."""
    logger = logging.getLogger("ray.data._internal.progress")
    if not any(isinstance(f, _DropMessages) for f in logger.filters):
        logger.addFilter(_DropMessages(RAY_DATA_NOTICES))


def apply_ray_output(verbose: bool | None = None) -> None:
    """Ray Data's output in this process (a job's driver): progress bars, the execution plan,
    Ray Data's INFO lines and its issue detectors' warnings on with ``-v``, off without.
    Datasets made afterwards carry it."""
    import ray.data

    verbose = ray_verbose() if verbose is None else verbose
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.enable_operator_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    issues = ctx.issue_detectors_config  # its hints: "consider setting memory=..."
    issues.detectors = type(issues)().detectors if verbose else []
    logging.getLogger("ray.data").setLevel(_ray_data_log_level(verbose))
    hide_ray_data_notices()


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h04m``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """When to log a progress line and what remains: ``total`` items (None: not known ahead,
    so no last line and no ETA) from ``start``, a line
    every ``every`` items or ``seconds`` (whichever comes first), and always the first and the
    last; ``eta`` extrapolates the rate since the first item (what came before it, starting
    Ray's actors and reading the first data, is not the pace of the rest).

    Screening, say: ``p = Progress(n_slides, seconds=30)``; per slide done ``i``:
    ``if p.due(i): log.info("%d/%d slides screened, %s", i, n_slides, p.eta(i))``.
    """

    def __init__(
        self,
        total: int | None,
        every: int | None = None,
        seconds: float | None = None,
        start: int = 0,
        clock=time.monotonic,
    ):
        self.total, self.every, self.seconds, self.start = total, every, seconds, start
        self.clock = clock
        self.t0 = self.last = clock()
        self.first: tuple[int, float] | None = None  # the first item seen, and when

    def due(self, done: int) -> bool:
        """Whether ``done`` gets a line; a line counts from here for ``seconds``."""
        now = self.clock()
        if self.first is None:
            self.first = (done, now)
        due = (
            (self.total is not None and done >= self.total)
            or done == self.start + 1
            or (self.every is not None and done % self.every == 0)
            or (self.seconds is not None and now - self.last >= self.seconds)
        )
        if due:
            self.last = now
        return due

    def eta(self, done: int) -> str:
        """``ETA 3m05s`` at the rate since the first item; ``done in 4m10s`` at the end."""
        if self.total is not None and done >= self.total:
            return f"done in {format_duration(self.clock() - self.t0)}"
        rate = self.rate(done)
        if self.total is None or rate <= 0:
            return "ETA ?"
        return f"ETA {format_duration((self.total - done) / rate)}"

    def rate(self, done: int) -> float:
        """Items per second since the first item; 0 until a later one is seen."""
        if self.first is None:
            return 0.0
        elapsed, n = self.clock() - self.first[1], done - self.first[0]
        return n / elapsed if n > 0 and elapsed > 0 else 0.0
