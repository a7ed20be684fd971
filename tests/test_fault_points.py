"""The fault points the fault-injection suite arms (``smartccs.faults``): off without
``$CCS_FAULTS``, deadly once when armed, and only where the armed match says. Each case runs in
a child process, since a point that fires SIGKILLs the process it is in."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from smartccs.faults import FAULTS_ENV, arm, disarm_all, fired

pytestmark = pytest.mark.faults


def _reach(point: str, detail: str, faults: Path | None) -> int:
    """Exit status of a process that reaches ``point`` with ``detail``, then exits 0."""
    env = {k: v for k, v in os.environ.items() if k != FAULTS_ENV}
    if faults is not None:
        env[FAULTS_ENV] = str(faults)
    code = f"from smartccs.faults import fault_point; fault_point({point!r}, {detail!r})"
    return subprocess.run([sys.executable, "-c", code], env=env, timeout=60).returncode


def test_an_armed_point_kills_the_first_process_that_reaches_it_once(tmp_path: Path):
    arm(tmp_path, "store.write", match="results/slides/")
    assert _reach("store.write", "results/cells/center=a/batch=b/part-0.parquet", tmp_path) == 0
    assert _reach("store.write", "results/slides/center=a/batch=b/part-0.parquet", tmp_path) == (
        -signal.SIGKILL
    )
    assert len(fired(tmp_path, "store.write")) == 1
    assert _reach("store.write", "results/slides/center=a/batch=b/part-0.parquet", tmp_path) == 0
    assert disarm_all(tmp_path) == [] and not list(tmp_path.iterdir())


def test_points_do_nothing_unless_armed_and_enabled(tmp_path: Path):
    assert _reach("tiles.read", "x", tmp_path) == 0, "enabled, not armed"
    arm(tmp_path, "tiles.read")
    assert _reach("tiles.read", "x", None) == 0, "armed, but no $CCS_FAULTS in the process"
    assert _reach("tiles.plan", "x", tmp_path) == 0, "another point"
    assert fired(tmp_path, "tiles.read") == []
    assert disarm_all(tmp_path) == ["tiles.read"], "reports the point that never fired"
