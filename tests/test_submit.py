"""Submitting jobs: checks before anything is sent, a real job on the local Ray's job server,
the production config and the KubeRay RayJob manifests."""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml
from cli import assert_one_line_error, run_ccs
from ray.job_submission import JobSubmissionClient
from test_pretrain import toy_config

from smartccs.errors import CCSError
from smartccs.models.artifacts import list_versions, load_model
from smartccs.models.encoder import PRODUCTION_ENCODER
from smartccs.models.zoo import ZOO
from smartccs.submit import (
    CONFIG_ENV,
    CONFIG_MAX_BYTES,
    DEFAULT_ADDRESS,
    _config_in,
    config_env,
    job_entrypoint,
    resolve_address,
    server_auth_mode,
    should_send_token,
    submit_job,
)
from smartccs.train.pretrain import PretrainConfig
from smartccs.upload import upload_batch

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "jobs/configs/pretrain-demo.yaml"
NOWHERE = "http://127.0.0.1:9"  # nothing listens: a check that gets this far has failed
MANIFESTS = {
    "pretrain": ("pretrain", "pretrain"),
    "finetune-detector": ("finetune_detector", "detector"),
    "finetune-classifier": ("finetune_classifier", "classifier"),
    "screen": ("screen", "screen"),
}


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


# --- checks before anything is sent ------------------------------------------------------------


def test_entrypoint_is_the_job_module_with_a_config_relative_to_the_working_dir():
    assert job_entrypoint("pretrain", DEMO_CONFIG, REPO) == (
        "python -m jobs.pretrain --config jobs/configs/pretrain-demo.yaml"
    )
    assert job_entrypoint("pretrain", DEMO_CONFIG, REPO, store="s3://b/my store").endswith(
        "--store 's3://b/my store'"
    )


@pytest.mark.parametrize("name", ["nope", "../pretrain", "Pretrain", "__init__"])
def test_unknown_job_is_one_line_naming_the_jobs_there_are(name):
    with pytest.raises(CCSError) as exc:
        submit_job(name, DEMO_CONFIG, NOWHERE, working_dir=REPO)
    message = _one_line(exc)
    assert f"unknown job {name!r}" in message and "pretrain" in message.split("jobs:")[1]


def test_missing_config_is_one_line(tmp_path):
    with pytest.raises(CCSError, match="not found") as exc:
        submit_job("pretrain", REPO / "jobs/configs/nope.yaml", NOWHERE, working_dir=REPO)
    _one_line(exc)


def test_a_config_from_anywhere_travels_in_the_jobs_environment(tmp_path):
    outside = tmp_path / "pretrain.yaml"
    shutil.copy(DEMO_CONFIG, outside)
    assert job_entrypoint("pretrain", outside, REPO) == (
        "python -m jobs.pretrain --config env:CCS_JOB_CONFIG"
    )
    assert config_env(outside, REPO) == {CONFIG_ENV: DEMO_CONFIG.read_text()}
    assert config_env(DEMO_CONFIG, REPO) == {}, "a config Ray uploads goes by its path"
    # inside the checkout but left out of the upload (.gitignore'd, a local store): shipped too
    for ignored in ("tmp/my.yaml", "ccs-data/my.yaml"):
        assert _config_in(REPO / ignored, REPO) is None, ignored
    with pytest.raises(CCSError, match="CCS_JOB_CONFIG carries the config"):
        submit_job("pretrain", outside, NOWHERE, working_dir=REPO, extra_env={CONFIG_ENV: "x"})
    outside.write_text("- not\n- a mapping\n")
    with pytest.raises(CCSError, match="expected a mapping"):
        submit_job("pretrain", outside, NOWHERE, working_dir=REPO)
    outside.write_text("run_name: big\n" + "#" * CONFIG_MAX_BYTES)
    with pytest.raises(CCSError, match="put it under the working directory"):
        submit_job("pretrain", outside, NOWHERE, working_dir=REPO)


def test_extra_env_cannot_set_what_the_driver_sets():
    with pytest.raises(CCSError, match="OMP_NUM_THREADS"):
        submit_job(
            "pretrain", DEMO_CONFIG, NOWHERE, working_dir=REPO, extra_env={"OMP_NUM_THREADS": "4"}
        )


def test_unreachable_job_server_is_one_line(tmp_path):
    with pytest.raises(CCSError, match="cannot reach a Ray job server") as exc:
        submit_job("pretrain", DEMO_CONFIG, NOWHERE, working_dir=REPO)
    _one_line(exc)


def test_address_argument_then_environment_then_local_default(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None) == DEFAULT_ADDRESS == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265/")
    assert resolve_address(None) == "http://head:8265"
    assert resolve_address("http://other:8265") == "http://other:8265"


@pytest.mark.parametrize(
    ("address", "env", "send"),
    [
        ("http://127.0.0.1:8265", {}, True),  # a local cluster: its token is ~/.ray/auth_token
        ("http://localhost:8265", {}, True),
        ("http://head.example:8265", {}, False),  # remote, nothing given: Ray's default
        ("http://head.example:8265", {"RAY_AUTH_TOKEN": "t"}, True),  # given explicitly
        ("http://head.example:8265", {"RAY_AUTH_TOKEN_PATH": "/t"}, True),
        ("http://127.0.0.1:8265", {"RAY_AUTH_MODE": "token"}, False),  # the SDK sends it
        ("http://127.0.0.1:8265", {"RAY_AUTH_MODE": "disabled"}, False),
    ],
)
def test_when_submit_sends_the_token_itself(address, env, send):
    """Where the job server cannot say its mode (an older Ray, a GCS address)."""
    assert should_send_token(address, env) is send


@pytest.mark.parametrize(
    ("env", "mode", "send"),
    [
        ({}, "token", True),  # a remote cluster in token mode: ~/.ray/auth_token and the like
        ({}, "disabled", False),
        ({"RAY_AUTH_TOKEN": "t"}, "disabled", False),  # never sent where it is not asked for
        ({"RAY_AUTH_MODE": "token"}, "token", False),  # the SDK sends it
        ({"RAY_AUTH_MODE": "disabled"}, "token", False),  # the user's word stands
    ],
)
def test_the_job_servers_own_mode_decides_when_it_can_say(env, mode, send):
    assert should_send_token("http://head.example:8265", env, server_mode=mode) is send


@pytest.mark.ray
def test_a_local_job_server_says_it_wants_a_token(ray_session):
    assert server_auth_mode(ray_session) == "token"  # ray.init turned token auth on


def test_a_server_that_cannot_say_its_mode_is_none():
    assert server_auth_mode(NOWHERE, timeout=2) is None
    assert server_auth_mode("10.0.0.1:6379") is None  # a GCS address: not asked


def test_ccs_submit_unknown_job_exits_1_with_one_line():
    res = run_ccs("submit", "nope", "--config", "jobs/configs/pretrain-demo.yaml", cwd=REPO)
    assert res.returncode == 1
    assert_one_line_error(res, "unknown job 'nope'", "pretrain")
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_ccs_submit_bad_env_is_a_usage_error():
    res = run_ccs("submit", "pretrain", "--config", str(DEMO_CONFIG), "--env", "NOEQUALS")
    assert res.returncode == 2 and "KEY=VALUE" in res.stderr


# --- a real job on the shared local Ray's job server -------------------------------------------


def _working_dir(tmp_path: Path, raw: dict) -> tuple[Path, Path]:
    """A working dir as a checkout has it: the job entrypoints plus a config inside it."""
    wd = tmp_path / "wd"
    shutil.copytree(REPO / "jobs", wd / "jobs", ignore=shutil.ignore_patterns("__pycache__"))
    config = wd / "configs" / "toy.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump(raw))
    return wd, config


def _job_path() -> str:
    """PATH for the job: its `python` is this interpreter, as in an activated venv."""
    return f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"


@pytest.mark.ray
@pytest.mark.slow
def test_ccs_submit_runs_pretrain_on_the_job_server(
    ray_job_address, tiny_cohort, local_store, tmp_path, monkeypatch
):
    center_dir = sorted(p.parent for p in tiny_cohort.glob("*/manifest.json"))[0]
    upload_batch(center_dir, center=center_dir.name, batch="b1", store=local_store, progress=False)
    cfg = toy_config(local_store, tmp_path, max_steps=2)
    wd, config = _working_dir(tmp_path, cfg.model_dump(mode="json"))
    # a fresh shell: not in token mode, so `ccs submit` must find the local cluster's token
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    res = run_ccs(
        "submit",
        "pretrain",
        "--config",
        str(config),
        "--working-dir",
        str(wd),
        "--address",
        ray_job_address,
        "--env",
        f"PATH={_job_path()}",
        timeout=540,
    )
    assert res.returncode == 0, (res.stdout[-4000:], res.stderr[-2000:])
    assert "Running entrypoint" in res.stdout and "jobs.pretrain --config configs/toy.yaml" in (
        res.stdout
    )
    for step in (1, 2):  # the Ray Train worker's progress lines reach the job's logs
        progress = rf"step {step}(/2)? epoch \d+ loss \d+\.\d+"
        assert re.search(progress, res.stdout), res.stdout[-4000:]
    assert re.search(r"saved encoder \S+ after step 2", res.stdout), res.stdout[-4000:]
    done = re.search(r"^job (ccs-pretrain-\S+) SUCCEEDED$", res.stdout, re.M)
    assert done, res.stdout[-2000:]
    # its driver joined this Ray (the job table has its Ray job id), not another on the machine
    jobs = {d.submission_id: d for d in JobSubmissionClient(ray_job_address).list_jobs()}
    assert jobs[done.group(1)].job_id, jobs[done.group(1)]

    (version,) = list_versions(local_store, "encoder")
    card, _ = load_model(local_store, "encoder")
    assert card.version == version and card.metrics["steps"] == 2
    assert local_store.exists("models", "encoder", version, "weights.safetensors")


@pytest.mark.ray
@pytest.mark.slow
def test_a_failed_job_is_one_line_naming_it_and_its_logs(ray_job_address, tmp_path):
    wd, config = _working_dir(tmp_path, {"run_name": "bad", "no_such_field": 1})
    with pytest.raises(CCSError) as exc:
        submit_job(
            "pretrain",
            config,
            ray_job_address,
            working_dir=wd,
            follow_logs=False,
            extra_env={"PATH": _job_path()},
        )
    message = _one_line(exc)
    job_id = re.search(r"job (ccs-pretrain-\S+) FAILED", message).group(1)
    assert f"ray job logs {job_id} --address {ray_job_address}" in message


@pytest.mark.ray
@pytest.mark.slow
def test_ccs_submit_no_wait_prints_the_job_and_how_to_follow_it(ray_job_address, tmp_path):
    wd, config = _working_dir(tmp_path, {"run_name": "bad", "no_such_field": 1})
    # RAY_AUTH_MODE=token (ray.init set it here) is inherited: Ray's SDK sends the token itself
    res = run_ccs(
        "submit",
        "pretrain",
        "--config",
        str(config),
        "--working-dir",
        str(wd),
        "--address",
        ray_job_address,
        "--no-wait",
    )
    assert res.returncode == 0, res.stderr
    job_id = re.search(r"^submitted (ccs-pretrain-\S+) \(\w+\) to ", res.stdout, re.M).group(1)
    assert f"ray job logs {job_id} --address {ray_job_address} --follow" in res.stdout
    client = JobSubmissionClient(ray_job_address)
    deadline = time.monotonic() + 120
    while not client.get_job_status(job_id).is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert client.get_job_status(job_id).is_terminal()


# --- the production config and the KubeRay manifests -------------------------------------------


def test_pretrain_prod_config_validates():
    raw = yaml.safe_load((REPO / "jobs/configs/pretrain-prod.yaml").read_text())
    cfg = PretrainConfig.model_validate(raw)
    # continued from Meta's DINOv2 as the reference is: the ViT-L/14 the import registers
    assert cfg.init_from == "dinov2-vitl14"
    kind = ZOO[cfg.init_from].architecture
    assert kind.timm_name == PRODUCTION_ENCODER.timm_name
    assert kind.kwargs["img_size"] == cfg.crops.global_size
    assert (cfg.crops.global_size, cfg.crops.local_size, cfg.dino.out_dim) == (224, 98, 65536)
    assert cfg.scaling.num_workers == 8 and cfg.scaling.use_gpu
    assert cfg.store.uri.startswith("s3://")
    assert cfg.stream.tiling.target_mpp == 0.5
    assert cfg.stream.tiling.tile_px >= cfg.crops.global_size, "views are crops of a tile"


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


@pytest.mark.parametrize("manifest", sorted(MANIFESTS))
def test_rayjob_manifest(manifest):
    module, config = MANIFESTS[manifest]
    job = yaml.safe_load((REPO / f"infra/rayjob-{manifest}.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["entrypoint"] == f"python -m jobs.{module} --config jobs/configs/{config}-prod.yaml"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["backoffLimit"] >= 1
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    (group,) = cluster["workerGroupSpecs"]
    worker = group["template"]["spec"]["containers"][0]
    submitter = spec["submitterPodTemplate"]["spec"]["containers"][0]
    # CPU pods run the CPU image, GPU workers its CUDA build (infra/Dockerfile's two targets)
    assert {head["image"], submitter["image"]} == {"ghcr.io/smartccs/smartccs:0.1.0"}
    assert worker["image"] == "ghcr.io/smartccs/smartccs:0.1.0-cuda"
    assert "nvidia.com/gpu" not in str(head["resources"])
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in group[
        "template"
    ]["spec"]["tolerations"]

    prod = yaml.safe_load((REPO / "jobs/configs/pretrain-prod.yaml").read_text())
    for container in (head, worker, submitter):  # every Ray process and the submitter
        env = _env(container)
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "smartccs-ray-token"
    for container in (head, worker):
        env = _env(container)
        assert env["CCS_STORE"]["value"] == prod["store"]["uri"]
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "smartccs-s3"
        assert "value" not in env["AWS_SECRET_ACCESS_KEY"]
        assert env["AWS_REGION"]["value"]
    assert (REPO / "jobs" / f"{module}.py").is_file()
    assert (REPO / f"jobs/configs/{config}-prod.yaml").is_file()
