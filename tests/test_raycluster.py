"""A job that starts its own Ray uses that one, even beside other Rays on the machine.

Issue 27, item 9: with several local Rays on one machine every training log printed a
``PlacementGroupCleaner`` traceback, "Found multiple active Ray instances": the cleaner (an
actor of Ray Train's) asks Ray's state API whether the run's controller is alive, and with no
address given the state API searches the machine for a Ray. The test starts a local Ray the
jobs' way in a child process while the test session's own Ray runs (so there are two), and
checks that the driver and a worker of the child name the child's Ray in ``RAY_ADDRESS`` and
that a worker's state API query, the cleaner's own, answers from it.

Manual check of the whole story (too slow for the suite: a Ray Train fit beside a second
local Ray, about a minute on 2 cores): start ``ccs demo`` (or any Ray), then run a
``TorchTrainer`` fit after ``smartccs.raycluster.init_ray()`` in another process; its output
has no ``PlacementGroupCleaner`` traceback and no "Failed to query Ray Train Controller actor
state" lines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CHILD = r"""
import json, os
import ray
from smartccs.raycluster import init_ray

init_ray()

@ray.remote(num_cpus=0)
class Probe:
    def ask(self, actor_id):
        from ray.util.state import get_actor  # what PlacementGroupCleaner calls
        return os.environ.get("RAY_ADDRESS"), get_actor(actor_id, timeout=60).state

probe = Probe.remote()
worker_address, state = ray.get(probe.ask.remote(probe._actor_id.hex()))
print("RESULT " + json.dumps({
    "started": ray.get_runtime_context().gcs_address,
    "driver": os.environ.get("RAY_ADDRESS"),
    "worker": worker_address,
    "state": state,
}), flush=True)
"""


@pytest.mark.slow
def test_a_started_local_ray_is_the_one_its_driver_and_workers_find(ray_session: str):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own
    child = subprocess.run(
        [sys.executable, "-c", CHILD],
        env=env | {"OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = child.stdout + child.stderr
    assert "Found multiple active Ray instances" not in out, out[-4000:]
    assert child.returncode == 0, out[-4000:]
    [line] = [x for x in child.stdout.splitlines() if x.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    assert result["driver"] == result["started"], result
    assert result["worker"] == result["started"], result
    assert result["state"] == "ALIVE", result


def test_a_worker_of_a_job_started_in_the_background_can_be_interrupted_again():
    """A job started with ``&`` or ``nohup`` hands Ray's workers an ignored SIGINT; Ray cancels
    tasks with SIGINT and, finding it ignored, printed "TypeError: 'Handlers' object is not
    callable" in the demo's log. The worker hook restores Python's own handler."""
    code = (
        "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "from smartccs.raycluster import setup_worker; setup_worker()\n"
        "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True", out.stderr


def test_a_job_starts_its_own_ray_beside_a_ray_start_head_on_the_same_machine():
    """The README's tour: after `ray start --head`, `python -m jobs.pretrain` ("here, local
    Ray") failed with "When connecting to an existing cluster, num_cpus and num_gpus must not
    be provided": with no address Ray joins the cluster `ray start` last wrote to
    <temp>/ray/ray_current_cluster. Here that file names a cluster that is not there."""
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix="ccs-r-")  # short: Ray's socket paths
    try:
        os.makedirs(os.path.join(tmp, "ray"))
        with open(os.path.join(tmp, "ray", "ray_current_cluster"), "w") as f:
            f.write("127.0.0.1:9")
        code = (
            "import ray; from smartccs.raycluster import init_ray; init_ray()\n"
            "print('RESULT', ray.get_runtime_context().gcs_address); ray.shutdown()"
        )
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": tmp}
        child = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
        )
        out = child.stdout + child.stderr
        assert child.returncode == 0, out[-3000:]
        [line] = [x for x in child.stdout.splitlines() if x.startswith("RESULT ")]
        assert not line.endswith("127.0.0.1:9"), line
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
