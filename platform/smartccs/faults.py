"""Fault points: named places in the real code path where a test can make the process die.

Off unless ``$CCS_FAULTS`` names a directory; nothing in production sets it, and then a point
costs one environment lookup. A point is armed by a file of its name in that directory
(:func:`arm`), optionally holding a substring the point's ``detail`` (a store key, a slide)
must contain. The first process to reach an armed point renames the file to
``<name>.fired-<pid>`` (a rename is atomic, so exactly one process fires) and SIGKILLs itself,
as the OOM killer or a lost node would: no ``finally``, no ``atexit``, no flush.

tests/test_faults.py arms these to kill a worker at a known moment instead of racing a timer
(docs/reliability.md).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

FAULTS_ENV = "CCS_FAULTS"


def fault_point(name: str, detail: str = "") -> None:
    """Die here if ``name`` is armed (and its match, if any, is in ``detail``); else nothing."""
    root = os.environ.get(FAULTS_ENV)
    if not root:
        return
    armed = os.path.join(root, name)
    try:
        with open(armed) as f:
            match = f.read()
    except OSError:
        return
    if match and match not in detail:
        return
    try:
        os.rename(armed, f"{armed}.fired-{os.getpid()}")
    except OSError:  # another process fired it first
        return
    print(f"fault point {name} ({detail}): SIGKILL pid {os.getpid()}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def arm(root: str | os.PathLike[str], name: str, match: str = "") -> None:
    """Make the next process that reaches ``name`` (with ``match`` in its detail) die there."""
    path = Path(root, name)
    tmp = path.with_name(f".{name}.tmp")
    tmp.write_text(match)
    tmp.replace(path)  # a point never sees a half-written match


def fired(root: str | os.PathLike[str], name: str) -> list[int]:
    """Pids of the processes that died at ``name`` since the directory was last cleared."""
    return sorted(int(p.name.rsplit("-", 1)[1]) for p in Path(root).glob(f"{name}.fired-*"))


def disarm_all(root: str | os.PathLike[str]) -> list[str]:
    """Remove every armed point and fired record; the names of points that never fired."""
    left = []
    for p in Path(root).iterdir():
        if ".fired-" not in p.name and not p.name.startswith("."):
            left.append(p.name)
        p.unlink(missing_ok=True)
    return sorted(left)
