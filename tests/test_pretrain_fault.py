"""Fault tolerance of pretraining: a Ray Train worker killed mid-run costs a restart, not the run.

Nothing is mocked: a real toy run goes on in a background thread of the test process (on the
session's Ray), the test waits for its first checkpoint in the store, then SIGKILLs the Ray
Train worker's process. Ray Train V2 must restart the worker group (``FailureConfig``) and the
new attempt must pick the newest checkpoint up through ``ray.train.get_checkpoint()``.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from test_pretrain import toy_config

from smartccs.models.artifacts import load_model
from smartccs.store import Store
from smartccs.train.loop import STATE_FILE
from smartccs.train.pretrain import PretrainResult, pretrain
from smartccs.upload import upload_batch

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

MAX_STEPS = 40
CHECKPOINT_EVERY = 5
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray 2.60 Train V2, in the run directory
WORKER_CLASS = "RayTrainWorker"  # ray.train.v2._internal.execution.worker_group.worker


def _registered_checkpoint_step(run_dir: Path) -> int | None:
    """The step of the newest checkpoint Ray Train's controller has registered, if any.

    A ``checkpoint_*`` directory with its state file is not enough: the worker writes it before
    its report reaches the controller, and a worker killed in between rightly restarts from the
    previous checkpoint (here: step 0). Resuming reads the checkpoint manager's snapshot, which
    the controller rewrites each time it registers a checkpoint, so the test reads that too.
    """
    try:
        snapshot = json.loads((run_dir / SNAPSHOT).read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or being rewritten
        return None
    latest = snapshot.get("latest_checkpoint_result")
    if not latest or not (run_dir / latest["checkpoint_dir_name"] / STATE_FILE).is_file():
        return None
    return int(latest["metrics"]["step"])


def _alive_train_workers() -> dict[str, int]:
    """Actor id -> pid of every live Ray Train worker actor.

    ``ray.util.state.list_actors`` needs the dashboard, which the session's Ray runs without
    (``include_dashboard=False``), so this reads the same actor table straight from the GCS.
    """
    import ray._private.state

    return {
        actor_id: int(info["Pid"])
        for actor_id, info in ray._private.state.actors().items()
        if info["ActorClassName"] == WORKER_CLASS and info["State"] == "ALIVE" and info["Pid"]
    }


def _wait_for(what: str, check, timeout_s: float, thread: threading.Thread, errors: list):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if errors:
            raise AssertionError(f"the run failed while waiting for {what}") from errors[0]
        value = check()
        if value:
            return value
        if not thread.is_alive():
            pytest.fail(f"the run ended before {what}; raise MAX_STEPS so there is time to kill")
        time.sleep(0.1)
    pytest.fail(f"no {what} within {timeout_s:.0f} s")


def test_killed_worker_resumes_from_last_checkpoint_not_step_zero(
    tiny_cohort: Path, local_store: Store, tmp_path: Path
):
    center_dir = sorted(p.parent for p in tiny_cohort.glob("*/manifest.json"))[0]
    upload_batch(center_dir, center=center_dir.name, batch="b1", store=local_store, progress=False)
    cfg = toy_config(local_store, tmp_path, max_steps=MAX_STEPS).model_copy(
        update={"run_name": "fault-run", "checkpoint_every": CHECKPOINT_EVERY, "max_failures": 2}
    )
    run_dir = Path(local_store.path("runs", cfg.run_name))

    results: list[PretrainResult] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(pretrain(cfg))
        except BaseException as e:  # handed to the test thread below
            errors.append(e)

    thread = threading.Thread(target=run, name="pretrain", daemon=True)
    thread.start()

    # A checkpoint must exist before the kill, or a restart from step 0 would be correct.
    _wait_for(
        "registered checkpoint", lambda: _registered_checkpoint_step(run_dir), 120, thread, errors
    )
    workers = _wait_for("live Ray Train worker", _alive_train_workers, 30, thread, errors)
    assert len(workers) == 1, f"one worker configured, found {workers}"
    [(actor_id, pid)] = workers.items()
    checkpointed = _registered_checkpoint_step(run_dir)
    assert checkpointed is not None and checkpointed < MAX_STEPS, (
        f"checkpoint at step {checkpointed} before the kill; raise MAX_STEPS"
    )
    os.kill(pid, signal.SIGKILL)

    thread.join(timeout=150)
    assert not thread.is_alive(), "the run did not finish within 150 s of the kill"
    if errors:
        raise AssertionError("the run failed after the worker was killed") from errors[0]
    [result] = results

    assert actor_id not in _alive_train_workers(), "the killed worker is still alive"
    assert result.step == MAX_STEPS, "the run finished all its steps"
    assert result.start_step > 0, "the last attempt started from step 0, not a checkpoint"
    assert result.start_step % CHECKPOINT_EVERY == 0, (
        f"the last attempt started at step {result.start_step}, which is no checkpoint step"
    )
    assert checkpointed <= result.start_step < MAX_STEPS, (
        f"step {checkpointed} was checkpointed before the kill, yet the last attempt started at "
        f"step {result.start_step}"
    )
    card, weights = load_model(local_store, "encoder")
    assert card.version == result.version and card.metrics["steps"] == MAX_STEPS
    assert weights, "the saved encoder has weights"
    print(
        f"killed worker pid {pid} after the step {checkpointed} checkpoint; "
        f"last attempt ran steps {result.start_step}..{result.step}"
    )
