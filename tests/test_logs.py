"""Jobs show their own progress; Ray's progress output is off unless asked for (``-v``).

Issue 27, item 7: a training job's step lines sat in 170 KB of Ray Data operator dumps
("Execution plan of Dataset", "Total Progress", tqdm "Running Dataset" bars) and came every
step. The end-to-end test runs a small real Ray Data pipeline (in the driver, and through
``streaming_split`` in an actor as Ray Train does) through a job's own door
(``smartccs.jobrunner.run_job``, which starts a local Ray of the child's own), once plain and
once with ``-v``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from smartccs.logs import Progress, format_duration
from smartccs.train.loop import RunFields, log_interval

CHILD = r"""
import sys, time
from pydantic import BaseModel
from smartccs.jobrunner import run_job

class Toy(BaseModel):
    rows: int

def run(cfg):
    import ray
    import ray.data

    in_driver = ray.data.range(cfg.rows, override_num_blocks=4).map_batches(lambda b: b)
    n = in_driver.materialize().count()
    [shard] = ray.data.range(cfg.rows, override_num_blocks=4).streaming_split(1)

    @ray.remote(num_cpus=0.5)
    def consume(it):
        return sum(len(b["id"]) for b in it.iter_batches(batch_size=8))

    n += ray.get(consume.remote(shard))
    time.sleep(2)  # the workers' lines reach the driver's output
    return n

sys.exit(run_job("jobs.toy", None, Toy, run, lambda n: f"toy: {n} rows", sys.argv[1:]))
"""

RAY_DATA_PROGRESS = ("Execution plan of Dataset", "Total Progress", "Running Dataset")


def _run_toy_job(tmp_path: Path, *flags: str) -> str:
    config = tmp_path / "toy.yaml"
    config.write_text("rows: 64\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "CCS_LOG"))}
    child = subprocess.run(
        [sys.executable, "-c", CHILD, "--config", str(config), *flags],
        env=env | {"OMP_NUM_THREADS": "1"},  # a Ray of its own
        capture_output=True,
        text=True,
        timeout=400,
    )
    out = child.stdout + child.stderr
    assert child.returncode == 0, out[-4000:]
    assert "toy: 128 rows" in child.stdout, out[-4000:]
    return out


@pytest.mark.slow
def test_ray_data_progress_is_off_by_default_and_back_with_verbose(tmp_path: Path):
    quiet = _run_toy_job(tmp_path)
    for line in (*RAY_DATA_PROGRESS, "Progress bars disabled", "execution finished"):
        assert line not in quiet, f"{line!r} in the default output:\n{quiet[-4000:]}"
    print(f"default: {len(quiet)} characters")

    verbose = _run_toy_job(tmp_path, "-v")
    for line in RAY_DATA_PROGRESS:
        assert line in verbose, f"{line!r} missing with -v:\n{verbose[-4000:]}"
    print(f"-v: {len(verbose)} characters")


def test_training_logs_a_progress_line_every_n_steps_the_first_and_always_the_last():
    cfg = RunFields(run_name="r", max_steps=50, log_every=20)
    progress = Progress(cfg.max_steps, every=log_interval(cfg))
    assert [s for s in range(1, 51) if progress.due(s)] == [1, 20, 40, 50]

    default = RunFields(run_name="r", max_steps=200)
    assert default.log_every is None and log_interval(default) == 10, "about 20 lines a run"
    assert log_interval(RunFields(run_name="r", max_steps=3)) == 1

    resumed = Progress(50, every=20, start=37)  # a resumed run: its first step, then on
    assert [s for s in range(38, 51) if resumed.due(s)] == [38, 40, 50]


def test_progress_eta_extrapolates_the_pace_since_the_first_item_not_the_start_up():
    now = [100.0]
    progress = Progress(300, every=10, start=100, clock=lambda: now[0])
    now[0] += 30.0  # Ray's actors start and the first data is read: not the pace of the rest
    assert progress.due(101) and progress.eta(101) == "ETA ?"
    now[0] += 40.0  # 40 steps in 40 s: 159 left take 159 s
    assert progress.eta(141) == "ETA 2m39s"
    now[0] += 159.0
    assert progress.eta(300) == "done in 3m49s"


def test_progress_every_few_seconds_when_items_come_slowly():
    now = [0.0]
    progress = Progress(36, seconds=30, clock=lambda: now[0])
    due = []
    for slide in range(1, 37):
        now[0] += 4.0  # a slide every 4 s: a line every 8th slide (32 s), the first, the last
        due.append(progress.due(slide))
    assert [i + 1 for i, d in enumerate(due) if d] == [1, 9, 17, 25, 33, 36]


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (42.4, "42s"), (185, "3m05s"), (7440, "2h04m")]
)
def test_durations_read_as_a_person_writes_them(seconds: float, text: str):
    assert format_duration(seconds) == text


def test_run_hash_ignores_how_often_a_run_logs():
    """A finished run stays finished whatever ``log_every`` says (and hashes as before the
    field became optional, when every run logged every step)."""
    from smartccs.train.loop import _run_sha256

    base = RunFields(run_name="r", max_steps=50)
    assert _run_sha256(base) == _run_sha256(base.model_copy(update={"log_every": 1}))
    assert _run_sha256(base) == _run_sha256(base.model_copy(update={"log_every": 20}))
    assert _run_sha256(base) != _run_sha256(base.model_copy(update={"max_steps": 51}))


def test_a_submitted_job_gets_the_submitters_verbosity():
    """``ccs -v submit NAME`` runs ``python -m jobs.NAME ... -v``; the variables that carry it
    to the job's workers are the driver's own, not to be set from ``--env``."""
    from smartccs.logs import ray_output_env
    from smartccs.submit import DRIVER_ENV_KEYS, job_entrypoint

    repo = Path(__file__).resolve().parents[1]
    config = repo / "jobs/configs/pretrain-demo.yaml"
    assert job_entrypoint("pretrain", config, repo).endswith("pretrain-demo.yaml")
    assert job_entrypoint("pretrain", config, repo, verbose=1).endswith("pretrain-demo.yaml -v")
    assert set(ray_output_env(verbose=True)) <= DRIVER_ENV_KEYS
    assert ray_output_env(verbose=False)["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"
    assert ray_output_env(verbose=True)["RAY_DATA_DISABLE_PROGRESS_BARS"] == "0"


def test_ray_data_s_issue_warnings_are_off_by_default_and_back_with_verbose():
    """The demo's log carried Ray Data's "Found 2 issues ... consider setting memory=" blocks
    for its tiny pipelines; they are hints for -v."""
    import ray.data

    from smartccs.logs import apply_ray_output

    ctx = ray.data.DataContext.get_current()
    try:
        apply_ray_output(False)
        assert ctx.issue_detectors_config.detectors == []
        apply_ray_output(True)
        assert ctx.issue_detectors_config.detectors
    finally:
        apply_ray_output(False)
