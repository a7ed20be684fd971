"""``make test``: the suite as two pytest sessions side by side, one per core of a CI machine.

Alone, the suite keeps 2 cores about 65 % busy: much of a Ray test is waiting on processes
starting, health polls and HTTP round trips. Two sessions fill that time:

- ``shared-ray``: the tests on the shared Ray (marker ``ray``) but the toy demo's;
- ``rest``: every test without the shared Ray (those that start a Ray or a head of their own
  among them), then the toy demo's tests (the README tour, the study, the review workstation),
  on a Ray of this session's own that starts once the other session's holds the dashboard
  agent's fixed port (see ``pytest_collection_modifyitems`` in conftest.py).

Each is an ordinary pytest run (``pytest -m "<its marker expression>"`` runs it alone) and
every argument given here goes to both. Their output is printed line by line with the
session's name in front, then each one's summary; the exit status is the first non-zero one
(pytest's 5 included: a session that collects nothing fails).
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SESSIONS = {
    "shared-ray": "ray and not toy_demo",
    "rest": "not ray or toy_demo",
}
"""Each session's marker expression; together they select every test once."""

SUMMARY = re.compile(r"\d+ (passed|failed|errors?|skipped|deselected)|no tests ran")


def _relay(name: str, stream, tail: list[str], lock: threading.Lock) -> None:
    for line in stream:
        tail.append(line)
        with lock:
            sys.stdout.write(f"[{name}] {line}")
            sys.stdout.flush()


def main(argv: list[str]) -> int:
    lock = threading.Lock()
    runs: dict[str, tuple[subprocess.Popen, threading.Thread, list[str]]] = {}
    for name, expression in SESSIONS.items():
        process = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-m", expression, "--color=no", *argv],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        )  # fmt: skip
        tail: list[str] = []
        relay = threading.Thread(target=_relay, args=(name, process.stdout, tail, lock))
        relay.start()
        runs[name] = (process, relay, tail)
    codes = {}
    for name, (process, relay, _) in runs.items():
        codes[name] = process.wait()
        relay.join()
    for name, (_, _, tail) in runs.items():
        summary = next((line for line in reversed(tail) if SUMMARY.search(line)), "(no summary)")
        print(f"{name}: exit {codes[name]}, {summary.strip().strip('= ')}")
    return next((code for code in codes.values() if code != 0), 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
