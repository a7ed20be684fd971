"""A Ray head of its own, started as docs/training.md says (``ray start --head``), for the tests
that drive a cluster the way the platform engineer does (test_submit_cluster.py,
test_readme.py).

It runs in a session of its own with its own temp dir, home and ports, so it never meets the
suite's shared Ray or a demo on the same machine, and every process of that session is killed
at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from smartccs.submit import server_auth_mode

BIN = Path(sys.executable).parent
RAY = BIN / "ray"

TRAIN_TIMING_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}
"""Ray Train timing for the suite. By default its controller polls the workers every 2 s and
each run starts a spot-preemption watcher actor: on 2 cores that is 3.5 s of every fit (a
trivial TorchTrainer.fit, 12 s, takes 8.5 s with these), and the suite fits about 30 times.
No test here preempts a spot machine; the jobs' own settings are left as Ray ships them."""


NODE_PORT_FLAGS = (
    "node-manager-port", "object-manager-port", "metrics-export-port",
    "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
)  # fmt: skip


def node_port_args() -> list[str]:
    """A free port for each of a Ray node's own servers, so nodes of several tests coexist."""
    return [arg for flag in NODE_PORT_FLAGS for arg in (f"--{flag}", str(free_port()))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_name() -> str:
    """This machine by name (a remote head's address looks like this), else its loopback IP."""
    name = socket.gethostname()
    try:
        socket.gethostbyname(name)
    except OSError:
        return "127.0.0.1"
    return name


def session_pids(sid: int) -> list[int]:
    """The live processes of session ``sid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                if fields[3] == str(sid) and fields[0] != "Z":
                    found.append(int(entry))
    return found


def kill_session(sid: int, timeout: float = 30) -> None:
    """SIGKILL every process of session ``sid`` (one started with ``start_new_session``)."""
    deadline = time.monotonic() + timeout
    while (pids := session_pids(sid)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def fresh_env(home: Path) -> dict[str, str]:
    """A new shell of this user: no Ray variable of this test session (but the suite's Ray
    Train timing), the venv on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.pop("CCS_FAULTS", None)
    return env | TRAIN_TIMING_ENV | {"HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0",
                                     "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}  # fmt: skip


@contextlib.contextmanager
def ray_head(env: dict[str, str], num_cpus: int = 1) -> Iterator[str]:
    """``ray start --head`` in ``env`` (its ``HOME`` holds the cluster's token, if any); yields
    its job server's URL, addressed by this machine's host name as a remote head is."""
    root = Path(tempfile.mkdtemp(prefix="ccs-head-"))  # short: Ray's socket paths
    dashboard = free_port()
    command = [
        str(RAY), "start", "--head", "--block", "--disable-usage-stats",
        "--num-cpus", str(num_cpus), "--num-gpus", "0", "--object-store-memory", str(200 << 20),
        "--temp-dir", str(root / "ray"), "--port", str(free_port()),
        "--dashboard-host", "0.0.0.0", "--dashboard-port", str(dashboard),
        "--ray-client-server-port", str(free_port()),
        "--min-worker-port", "0", "--max-worker-port", "0",
    ]  # fmt: skip
    command += node_port_args()
    log = (root / "start.log").open("w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)  # fmt: skip
    address = f"http://{host_name()}:{dashboard}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if server_auth_mode(address, timeout=5) is not None:
                break
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start --head: {(root / 'start.log').read_text()[-3000:]}")
            time.sleep(1)
        yield address
    finally:
        kill_session(process.pid)
        process.wait(30)
        log.close()
        shutil.rmtree(root, ignore_errors=True)
