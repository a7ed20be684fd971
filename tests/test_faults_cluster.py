"""A worker node of a multi-node Ray cluster dies mid-run: its raylet and every worker
process on it are SIGKILLed while its scorer actor screens, and the batch job still
publishes each slide exactly once, from one run.

Real parts: a Ray cluster of its own, started with ``ray start`` (not the session's shared Ray,
which lives in the pytest process), with the shape of infra/rayjob-screen.yaml. Its head runs
the GCS and the job's driver and has no CPUs, so every task and actor runs on a worker node.
The driver is the batch door itself, ``python -m jobs.screen --address``, a subprocess of the
test. The store is moto's S3 over HTTP, and no local path is shared between nodes: each node
has a home of its own and so a slide cache of its own. Ray's token auth is on, as in
production (ray-cluster.yaml): every process of the cluster gets the same fresh token through
``RAY_AUTH_TOKEN``.

The fault:

- Worker node A takes the whole run: the planning tasks and the CellScorer actor. (The head
  having no CPUs is what puts them there: the screening config cannot ask for a custom
  resource.)
- Once the scorer has screened for a moment, every process of node A's session is
  SIGKILLed at once: the raylet, its object store, the agents and the workers. This is what
  the loss of a spot instance or a pod looks like.
- A replacement worker node B joins, with an empty cache, as KubeRay or the autoscaler
  would bring it.
- The GCS marks A dead. Its health check is shortened from about 15 s to about 3 s, so that
  the test stays near a minute.
- Ray restarts the scorer actor on B (``max_restarts=-1``: the test sees its process there)
  and retries its unfinished calls.
  The blocks A held in its object store are lost with it: Ray remakes them by rerunning the
  tasks that made them (lineage reconstruction), on B.

The result must then be what docs/reliability.md asks of every fault: exactly one row per
slide from the one run, no tile lost or counted twice, and nothing but ``part-0.parquet``
and ``_COMMITTED`` under ``results/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from smartccs.batches import load_batch, resolve_batches
from smartccs.data.tiles import StreamConfig, plan_slide, slide_rows
from smartccs.results.tables import read_table
from smartccs.slide.reader import open_slide
from smartccs.slide.tiling import plan_tiles
from smartccs.store import Store
from smartccs.upload import upload_batch

sys.path.insert(0, str(Path(__file__).parent))
from moto_buckets import moto_s3, new_s3_store
from ray_head import free_port, node_port_args
from test_faults import assert_one_row_per_slide
from toy_models import TOY_TILING, save_toy_models, toy_screening

pytestmark = [pytest.mark.faults, pytest.mark.s3]

ROOT = Path(__file__).parents[1]
RAY = Path(sys.executable).with_name("ray")
RUN_ID = "node-lost"
SCORER = "ray::MapWorker(MapBatches(CellScorer))"
"""The scorer actor's process title. While it runs a call, Ray appends the method:
``….submit``."""
SCREENED_CPU_S = 0.3
"""CPU seconds the scorer spends screening before its node is killed. The whole run
takes about 2 s: this is a few batches of tiles in."""
RAY_CONFIG = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_max_direct_call_object_size": "1024",
}
"""Ray settings of every process of the cluster:

- the GCS checks each raylet every second and marks a node dead after 3 failed checks in a
  row (Ray's defaults: every 3 s, 5 failures). A killed raylet refuses the connection at
  once, so A is found dead about 3 s after the kill instead of 15 s. Each check still waits
  Ray's default 10 s for an answer, so a live raylet on a loaded machine is not lost;
- a task's result larger than 1 KiB goes to its node's object store. Ray's default is
  100 KiB, and with it the tiny cohort's blocks (about 14 KiB each) would travel inside the
  replies, so the node would take nothing with it. Real slides make blocks far larger, so
  they live on the node that made them: here too, and the node's death loses them.
"""


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command: state, ppid, pgrp, session, …, utime,
    stime (11, 12); None when the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rsplit(")", 1)[1].split()


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def _cpu_s(pid: int) -> float:
    fields = _stat(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Node:
    """One Ray node: ``ray start --block`` in a session of its own, so that every process of
    the node, the workers the raylet starts included (each in its own process group), is in
    that session and in nobody else's. Its Ray temp dir and its home (hence its slide cache)
    are under ``root``, which no other node uses."""

    def __init__(self, name: str, env: dict[str, str], head: str | None = None, cpus: int = 0):
        """The head when ``head`` (its address) is None: no CPUs, as in
        infra/rayjob-screen.yaml, so that it runs the GCS and the driver only."""
        self.name = name
        self.root = Path(tempfile.mkdtemp(prefix=f"ccs-{name}-"))  # short: socket paths
        self.home = self.root / "home"
        self.home.mkdir()
        self.port = free_port() if head is None else None
        node_env = env | {
            "HOME": str(self.home),
            # where this node caches slides, read on the node (the last test of this file)
            "CCS_SLIDE_CACHE": str(self.root / "slide-cache"),
            "OMP_NUM_THREADS": "1",
        }
        command = [
            str(RAY), "start", "--block", "--disable-usage-stats",
            "--num-cpus", str(cpus), "--num-gpus", "0", "--object-store-memory", str(200 << 20),
            "--temp-dir", str(self.root / "ray"),
            "--min-worker-port", "0", "--max-worker-port", "0",
        ]  # fmt: skip
        command += node_port_args()
        if head is None:
            command += ["--head", "--port", str(self.port), "--include-dashboard", "false",
                        "--dashboard-port", str(free_port()),
                        "--ray-client-server-port", str(free_port())]  # fmt: skip
        else:
            command += ["--address", head]
        self.log = self.root / "start.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                command, env=node_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.node_id = ""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_up(self, timeout: float = 120) -> bool:
        """Whether the node's raylet registered with the GCS (its log says so, with the node's
        id). False when ``ray start`` gave up: it waits 30 s for the registration, which the
        agents' start can outlast on a loaded machine."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for out in self.root.glob("ray/session_*/logs/raylet.out"):
                found = re.search(r"Raylet of id, ([0-9a-f]+) started", out.read_text())
                if found:
                    self.node_id = found.group(1)
                    return True
            if self.process.poll() is not None:
                return False
            time.sleep(0.2)
        return False

    def pids(self) -> list[int]:
        """The node's live processes: those of its session. The session's leader stays a
        zombie until :meth:`kill` reaps it, so its id (the session id) cannot be reused."""
        sid = str(self.process.pid)
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                fields = _stat(int(entry))
                if fields and fields[3] == sid and fields[0] != "Z":
                    found.append(int(entry))
        return found

    def kill(self) -> list[int]:
        """SIGKILL every process of the node, the raylet and all its workers at once, until
        none is left (a raylet may start a worker while we kill); the pids killed first."""
        first: list[int] = []
        deadline = time.monotonic() + 20
        while (pids := self.pids()) and time.monotonic() < deadline:
            first = first or pids
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        self.process.wait(10)
        assert not self.pids(), f"node {self.name}: processes survived SIGKILL"
        return first

    def slides_cached(self, sizes: set[int]) -> list[Path]:
        """Files in the node's own slide cache ($CCS_SLIDE_CACHE) the size of one of the
        slides: the copies it made."""
        return [
            p
            for p in (self.root / "slide-cache").rglob("*")
            if p.is_file() and not p.is_relative_to(self.root / "ray") and p.stat().st_size in sizes
        ]


@pytest.fixture
def cluster_env() -> dict[str, str]:
    """The environment of every process of the cluster: this one's, without anything that
    points at the session's shared Ray (RAY_ADDRESS, its auth settings) or arms fault points,
    with a token of the cluster's own."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("RAY_") and k not in ("CCS_FAULTS", "CCS_SLIDE_CACHE")
    }
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    return env | token | {"RAY_USAGE_STATS_ENABLED": "0"} | RAY_CONFIG


@pytest.fixture
def nodes() -> Iterator[list[Node]]:
    """Nodes a test starts; every one is killed at the end, whatever happened."""
    started: list[Node] = []
    yield started
    survivors = []
    for node in reversed(started):  # workers first, the head (GCS) last
        try:
            node.kill()
        except AssertionError as exc:
            survivors.append(str(exc))
        shutil.rmtree(node.root, ignore_errors=True)
    assert not survivors, survivors


def start_node(nodes: list[Node], name: str, env: dict[str, str], head: Node) -> Node:
    """A worker node with 2 logical CPUs (a scorer and four planning tasks), once registered.
    One that fails to start is killed and another started in its place, as a cluster's
    operator would (three tries)."""
    for attempt in range(3):
        node = Node(f"{name}{attempt}", env, head=head.address, cpus=2)
        nodes.append(node)
        if node.wait_up():
            return node
        node.kill()
    pytest.fail(f"node {name} would not start: {node.log.read_text()[-3000:]}")


def _batches(s3_endpoint: str, tiny_cohort: Path) -> tuple[Store, dict[str, Path]]:
    store = new_s3_store(s3_endpoint, prefix="cluster")
    centers = {d.name: d for d in sorted(p.parent for p in tiny_cohort.glob("*/manifest.json"))}
    for center, folder in centers.items():
        upload_batch(folder, center=center, batch="b1", store=store, progress=False)
    save_toy_models(store)
    return store, centers


def _planned_tiles(folder: Path) -> dict[str, int]:
    """Each slide's tile count, planned here from the cohort's own file on the detector's
    grid: what every slide's ``n_tiles`` and ``tiles_read`` must be."""
    manifest = json.loads((folder / "manifest.json").read_text())
    counts = {}
    for s in manifest["slides"]:
        slide = open_slide(folder / s["path"])
        try:
            counts[s["slide_id"]] = len(plan_tiles(slide, TOY_TILING).tiles)
        finally:
            slide.close()
    return counts


@pytest.mark.ray  # a Ray of its own, not the shared one: `-m "not ray"` still skips it
@pytest.mark.slow
def test_worker_node_killed_while_screening(
    s3_endpoint: str, tiny_cohort: Path, cluster_env: dict[str, str], nodes: list[Node]
):
    """Two batches (two centers, two slides each) by ``python -m jobs.screen``; node A, which
    runs every task and the scorer, is killed mid-screening; B joins and finishes the run."""
    t0 = time.monotonic()
    store, centers = _batches(s3_endpoint, tiny_cohort)
    sizes = {s.bytes for c in centers for s in load_batch(store, c, "b1").manifest.slides}

    head = Node("head", cluster_env)
    a = Node("a", cluster_env, head=head.address, cpus=2)  # it joins once the GCS is up
    nodes += [head, a]
    assert head.wait_up(), f"the head did not start: {head.log.read_text()[-3000:]}"
    if not a.wait_up():
        a.kill()
        a = start_node(nodes, "a", cluster_env, head)

    # No cache_dir in the config: each node caches where its own CCS_SLIDE_CACHE says.
    screening = toy_screening(Path("unused")).model_dump(mode="json")
    del screening["stream"]["cache_dir"], screening["stream"]["cache_max_bytes"]
    job = {
        "store": {"uri": store.config.uri, "s3": moto_s3(s3_endpoint)},
        "batches": [f"{c}/b1" for c in centers],
        "run_id": RUN_ID,
        "screening": screening,
    }
    config = head.root / "screen.yaml"
    config.write_text(yaml.safe_dump(job))
    driver_home = head.root / "driver-home"
    driver_home.mkdir()
    output = head.root / "driver.log"
    with output.open("w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-m", "jobs.screen", "--config", str(config),
             "--address", head.address],
            cwd=ROOT, env=cluster_env | {"HOME": str(driver_home)}, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def driver_output() -> str:
        return output.read_text()[-6000:]

    try:
        # A's scorer at work: its title names the call it runs; then a little CPU later
        scorer, cpu0 = None, 0.0
        deadline = time.monotonic() + 240
        while True:
            assert driver.poll() is None, f"the run ended before A was killed:\n{driver_output()}"
            assert time.monotonic() < deadline, f"A's scorer never screened:\n{driver_output()}"
            if scorer is None:
                busy = [p for p in a.pids() if _title(p).startswith(f"{SCORER}.submit")]
                if busy:
                    scorer, cpu0 = busy[0], _cpu_s(busy[0])
            elif _cpu_s(scorer) - cpu0 >= SCREENED_CPU_S:
                assert _title(scorer).startswith(SCORER), "A's scorer died on its own"
                break
            time.sleep(0.05)
        killed_at = time.monotonic()
        killed = a.kill()
        assert scorer in killed and a.process.pid in killed
        b = start_node(nodes, "b", cluster_env, head)  # the replacement
        b_up_s = time.monotonic() - killed_at

        # the scorer actor is restarted on B, and the run ends
        moved, deadline = False, time.monotonic() + 240
        while driver.poll() is None:
            assert time.monotonic() < deadline, f"the run did not end:\n{driver_output()}"
            moved = moved or any(_title(p).startswith(SCORER) for p in b.pids())
            time.sleep(0.1)
        recovered_s = time.monotonic() - killed_at
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    log = output.read_text()
    assert driver.returncode == 0, driver_output()
    n = sum(len(load_batch(store, c, "b1").manifest.slides) for c in centers)
    summary = re.search(rf"run {RUN_ID}: {n} slides in {len(centers)} batches screened \(.*", log)
    assert summary and " 0 failed" in summary.group(0), driver_output()
    # the blocks A held were lost with it, and remade by rerunning the tasks that made them
    assert re.search(r"Attempting to recover \d+ lost objects", log), driver_output()

    # exactly one row per slide, all from this run, every tile read once; nothing partial
    for center, folder in centers.items():
        rows = assert_one_row_per_slide(store, center, "b1", RUN_ID)
        planned = _planned_tiles(folder)
        assert {r["slide_id"]: (r["n_tiles"], r["tiles_read"]) for r in rows} == {
            s: (t, t) for s, t in planned.items()
        }
    assert read_table(store, "slides").num_rows == n
    assert moved, "the scorer actor was restarted on B"

    # A screened before it died and B finished the run, each from its own copy of the slides;
    # nothing was cached on the head or by the driver
    assert a.slides_cached(sizes), "A had slides in its own cache"
    assert b.slides_cached(sizes), "B downloaded what it screened into its own cache"
    assert not head.slides_cached(sizes)
    print(
        f"node A killed {killed_at - t0:.1f} s in ({len(killed)} processes, scorer pid "
        f"{scorer}); B up {b_up_s:.1f} s later, the run published {recovered_s:.1f} s later"
    )


def test_a_node_caches_slides_where_its_own_ccs_slide_cache_says(
    s3_store: Store, tiny_cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """``CCS_SLIDE_CACHE`` says where slides are cached "on this node" (slide/cache.py). The
    driver builds the screening config, which travels to every node as it is: a worker
    node's own ``CCS_SLIDE_CACHE`` must still decide where that node caches."""
    folder = next(p.parent for p in sorted(tiny_cohort.glob("*/manifest.json")))
    upload_batch(folder, center=folder.name, batch="b1", store=s3_store, progress=False)
    row = slide_rows(resolve_batches(s3_store, [f"{folder.name}/b1"]))[0]

    monkeypatch.setenv("CCS_SLIDE_CACHE", str(tmp_path / "driver"))
    cfg = StreamConfig(tiling=TOY_TILING)  # made by the driver, as ScreeningConfig() is
    monkeypatch.setenv("CCS_SLIDE_CACHE", str(tmp_path / "node"))  # a worker node's own
    tiles = plan_slide(row, store_config=s3_store.config, cfg=cfg)  # a planning task there
    assert tiles and tiles[0]["status"] == "ok", tiles[0]

    cached = [p for p in tmp_path.rglob("*") if p.is_file() and p.stat().st_size == row["bytes"]]
    assert cached and all(p.is_relative_to(tmp_path / "node") for p in cached), cached
