"""A screening run whose actors and tasks cannot all be placed fails at once, never hangs.

Issue 25, item 6: with the study's screening settings (two 1-CPU scorer actors, 0.25-CPU
planning tasks) on a Ray started without the doors' logical-CPU floor (2 CPUs), the scorers
took both CPUs, the planning tasks waited for ever and nothing said why. The end-to-end test
runs that in a child process with a 2-CPU Ray of its own (the shared test Ray has 4).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).parent

HANG_S = 15.0
"""How long the child lets ``screen_batches`` run before calling it hung: the fix fails in
well under a second once Ray is up; on the unfixed engine nothing ever happens."""

CHILD = r"""
import json, os, shutil, sys, tempfile, threading
sys.path.insert(0, sys.argv[1])
import ray
from toy_models import save_toy_models
from smartccs import layout
from smartccs.batches import BatchRef
from smartccs.errors import CCSError
from smartccs.manifest import Manifest, SlideEntry
from smartccs.engine.config import ScreeningConfig
from smartccs.engine.screen import screen_batches
from smartccs.store import Store, StoreConfig
from smartccs.study.config import embedded_defaults

tmp, hang_s = sys.argv[2], float(sys.argv[3])
store = Store(StoreConfig(uri=f"{tmp}/store"))
save_toy_models(store)
settings = embedded_defaults()["screening"]  # the study's: 2 scorers x 1 CPU, planners 0.25
stream = settings["stream"] | {"cache_dir": f"{tmp}/cache"}
cfg = ScreeningConfig.model_validate(settings | {"stream": stream})
slide = SlideEntry(slide_id="s1", path="s1.svs", sha256="0" * 64, bytes=1)
manifest = Manifest(center="c1", batch="b1", slides=[slide])
ref = BatchRef(center="c1", batch="b1", prefix=layout.incoming("c1", "b1"), manifest=manifest)

temp_dir = tempfile.mkdtemp(prefix="ccs-ray-")
ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, _temp_dir=temp_dir)
out = {}

def run():
    try:
        screen_batches(store, [ref], cfg, run_id="cpu-floor")
        out["ok"] = True
    except CCSError as exc:
        out["error"] = str(exc)

worker = threading.Thread(target=run, daemon=True)
worker.start()
worker.join(hang_s)
if worker.is_alive():
    cpus = ray.available_resources().get("CPU", 0.0), ray.cluster_resources().get("CPU")
    print(f"HUNG: no result after {hang_s:.0f} s, {cpus[0]} of {cpus[1]} CPUs free", flush=True)
    os._exit(3)
print("RESULT " + json.dumps(out), flush=True)
ray.shutdown()
shutil.rmtree(temp_dir, ignore_errors=True)
"""


@pytest.mark.ray
@pytest.mark.slow
def test_study_settings_on_a_two_cpu_ray_fail_at_once_naming_the_settings(tmp_path: Path):
    """The study's scorer pool on a 2-CPU Ray: one line naming the settings to change, within
    seconds, instead of scorers holding every CPU while planning waits for ever."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own
    env["OMP_NUM_THREADS"] = "1"
    t0 = time.monotonic()
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(TESTS), str(tmp_path), str(HANG_S)],
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_S + 90,
    )
    elapsed = time.monotonic() - t0
    assert "HUNG" not in child.stdout, child.stdout + child.stderr[-3000:]
    assert child.returncode == 0, child.stderr[-3000:]
    [line] = [x for x in child.stdout.splitlines() if x.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    assert "error" in result, result
    message = result["error"]
    assert "\n" not in message
    for setting in ("scorers.actors=2", "scorers.cpus=1", "stream.planner_cpus=0.25"):
        assert setting in message, message
    assert "2 CPUs" in message and "4" in message, message  # what it has, what the doors start
    print(f"child done in {elapsed:.1f} s: {message}")


def _screening_error(monkeypatch, nodes, autoscaled=False, **pool) -> str | None:
    """``check_resources``'s message for ``pool`` (the study's settings otherwise) on ``nodes``
    (CPUs, GPUs) per node; no Ray is started."""
    from smartccs import raycluster
    from smartccs.engine.config import ScorerPool, ScreeningConfig
    from smartccs.engine.stream import check_resources
    from smartccs.study.config import embedded_defaults

    shapes = [{"CPU": float(c), "GPU": float(g)} for c, g in nodes]
    monkeypatch.setattr(raycluster, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr("ray.is_initialized", lambda: True)
    monkeypatch.setattr(raycluster, "cluster_nodes", lambda units: (shapes, autoscaled))
    cfg = ScreeningConfig.model_validate(embedded_defaults()["screening"])
    try:
        check_resources(cfg.stream, ScorerPool(**cfg.scorers.model_dump() | pool))
    except raycluster.ClusterTooSmallError as exc:
        assert "\n" not in str(exc)
        return str(exc)
    return None


def test_the_doors_floor_holds_the_study_settings(monkeypatch):
    assert _screening_error(monkeypatch, [(4, 0)]) is None
    assert _screening_error(monkeypatch, [(2.25, 0)]) is None, "exactly enough is enough"
    assert "needs 2.25 CPUs at once" in _screening_error(monkeypatch, [(2, 0)])


def test_nodes_are_packed_one_actor_at_a_time(monkeypatch):
    """Totals are not enough: an actor or task runs on one node."""
    assert _screening_error(monkeypatch, [(1.5, 0), (1.5, 0)]) is None  # one scorer each
    split = _screening_error(monkeypatch, [(1.2, 0), (1.2, 0)])  # 2.4 in all, 0.2 left each
    assert "2.4" not in split and "split over its nodes" in split and "planner_cpus" in split
    big = _screening_error(monkeypatch, [(2, 0), (2, 0)], cpus=3.0)
    assert "scorers.cpus=3 needs 3 CPUs on one node" in big and "at most 2 CPUs each" in big


def test_gpu_scorers_and_split_readers_are_counted(monkeypatch):
    gpu = _screening_error(monkeypatch, [(16, 1)], gpus=1.0)
    assert "needs 2 GPUs at once" in gpu and "has 1 GPU;" in gpu and "scorers.cpus/gpus" in gpu
    assert _screening_error(monkeypatch, [(16, 2)], gpus=1.0) is None
    reader = _screening_error(monkeypatch, [(2.5, 0)], fused=False)  # 2 + 0.5 + 0.25
    assert "needs 2.75 CPUs" in reader and "stream.reader_cpus=0.5" in reader


def test_an_autoscaled_cluster_is_judged_on_what_its_config_lets_it_grow_to(monkeypatch):
    """A KubeRay cluster scaling from zero has no worker yet: its config's node groups count.
    Built as the autoscaler reports it, the config Ray Data reads."""
    from ray.core.generated.autoscaler_pb2 import ClusterConfig, NodeGroupConfig

    from smartccs import raycluster

    def config(max_count: int) -> ClusterConfig:
        head = NodeGroupConfig(name="head", resources={"CPU": 0}, min_count=1, max_count=1)
        gpu = NodeGroupConfig(name="gpu", resources={"CPU": 40, "GPU": 4}, max_count=max_count)
        return ClusterConfig(node_group_configs=[head, gpu])

    monkeypatch.setattr("ray._private.state.state.get_cluster_config", lambda: config(2))
    nodes, autoscaled = raycluster.cluster_nodes(units=9)
    assert autoscaled and nodes == [{"CPU": 40.0, "GPU": 4.0}] * 2
    monkeypatch.setattr("ray._private.state.state.get_cluster_config", lambda: config(-1))
    assert raycluster.cluster_nodes(units=9) is None, "unbounded: anything may fit"

    grown = [(40, 4), (40, 4)]
    assert _screening_error(monkeypatch, grown, True, actors=8, cpus=4.0, gpus=1.0) is None
    short = _screening_error(monkeypatch, grown, True, actors=9, cpus=4.0, gpus=1.0)
    assert "needs 9 GPUs at once" in short and "can grow to 8 GPUs" in short


def test_training_runs_go_side_by_side_only_as_many_as_the_nodes_hold(monkeypatch):
    """The classifier's fold heads train together (``fit_many``) only while their worker
    groups all fit: one that does not would not queue but time out waiting for resources."""
    from smartccs import raycluster
    from smartccs.train.loop import ScalingFields, runs_at_once

    def on(nodes, autoscaled=False):
        shapes = [{"CPU": float(c), "GPU": float(g)} for c, g in nodes]
        monkeypatch.setattr(raycluster, "cluster_nodes", lambda units: (shapes, autoscaled))

    on([(4, 0)])
    assert runs_at_once(ScalingFields(cpus_per_worker=0.5), 6) == 6
    assert runs_at_once(ScalingFields(cpus_per_worker=1.5), 6) == 2
    assert runs_at_once(ScalingFields(cpus_per_worker=3), 6) == 1
    assert runs_at_once(ScalingFields(num_workers=2, cpus_per_worker=1), 6) == 2
    on([(8, 1), (8, 1)])
    gpu = ScalingFields(use_gpu=True, cpus_per_worker=2, gpus_per_worker=1)
    assert runs_at_once(gpu, 6) == 2, "one GPU per node: two workers at once"
    assert runs_at_once(ScalingFields(cpus_per_worker=2), 6) == 6, "CPU runs ignore the GPUs"
    monkeypatch.setattr(raycluster, "cluster_nodes", lambda units: None)
    assert runs_at_once(gpu, 6) == 6, "an unbounded autoscaler makes room"
