"""Run ``ccs`` as a user does: a separate process, its exit code, its stdout and stderr."""

import subprocess
import sys
from pathlib import Path


def run_ccs(
    *args: str, cwd: Path | None = None, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "smartccs.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(res: subprocess.CompletedProcess, *fragments: str) -> None:
    """Non-zero exit, no traceback, and an error line that names what went wrong."""
    assert res.returncode != 0, res.stdout
    assert "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("ccs: error: "), res.stderr
    for fragment in fragments:
        assert fragment in res.stderr, (fragment, res.stderr)
