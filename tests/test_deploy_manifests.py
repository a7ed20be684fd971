"""The deployment files agree with each other and with the code they deploy.

ray-cluster.yaml (Ray's cluster launcher), infra/raycluster.yaml, infra/rayjob-*.yaml,
infra/rayservice.yaml and infra/Dockerfile: Ray's own schema, one image pair and one Ray
version everywhere, token auth from the Secret in every Ray container, GPU pods that tolerate
the GPU taint and fit their instance type, job entrypoints that parse with their job's own
parser and config model, clusters that can hold the actors their configs ask for, and the
RayService's Serve config generated from serve/config.yaml.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
import shutil
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from cli import assert_one_line_error, run_ccs

from smartccs.deploy.rayservice import (
    OVERRIDES,
    RAYSERVICE,
    SERVE_CONFIG,
    ServeConfigError,
    cluster_serve_config,
    sync_rayservice,
)
from smartccs.deploy.sizing import NODE_TYPES
from smartccs.service.config import ServiceConfig

REPO = Path(__file__).resolve().parents[1]
RAYJOBS = sorted(REPO.glob("infra/rayjob-*.yaml"))
KUBE = [REPO / "infra/raycluster.yaml", *RAYJOBS, REPO / "infra/rayservice.yaml"]
TOKEN_SECRET = {"name": "smartccs-ray-token", "key": "auth_token"}


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _pinned(name: str) -> str:
    [line] = [
        x for x in (REPO / "constraints.txt").read_text().splitlines() if x.startswith(f"{name}==")
    ]
    return line.split("==", 1)[1]


def _images_from_dockerfile() -> dict[str, str]:
    """target -> image, from the build commands documented at the top of infra/Dockerfile."""
    text = (REPO / "infra/Dockerfile").read_text()
    found = dict(re.findall(r"--target (\w+)\s+-t (\S+)", text))
    assert set(found) == {"cpu", "cuda"}, found
    return found


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
            "RayService": spec.get("rayClusterConfig")}[doc["kind"]]  # fmt: skip


@dataclass
class Pod:
    """A pod template of a manifest: where it is, and its one container."""

    where: str
    spec: dict[str, Any]

    @property
    def container(self) -> dict[str, Any]:
        [c] = self.spec["containers"]
        return c

    @property
    def limits(self) -> dict[str, Any]:
        return self.container["resources"]["limits"]

    @property
    def gpus(self) -> int:
        return int(self.limits.get("nvidia.com/gpu", 0))

    @property
    def cpus(self) -> float:
        return _cpu(self.limits["cpu"])


def _pods(path: Path) -> list[Pod]:
    doc = _load(path)
    spec = _cluster_spec(doc)
    pods = [Pod(f"{path.name}: head", spec["headGroupSpec"]["template"]["spec"])]
    pods += [Pod(f"{path.name}: {g['groupName']}", g["template"]["spec"])
             for g in spec["workerGroupSpecs"]]  # fmt: skip
    if doc["kind"] == "RayJob":
        pods.append(Pod(f"{path.name}: submitter", doc["spec"]["submitterPodTemplate"]["spec"]))
    return pods


def _cpu(q: str | int | float) -> float:
    text = str(q)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _gib(q: str) -> float:
    units = {"Gi": 1.0, "Mi": 1 / 1024, "Ti": 1024.0}
    for suffix, factor in units.items():
        if q.endswith(suffix):
            return float(q[: -len(suffix)]) * factor
    raise AssertionError(f"memory {q!r} without a binary unit")


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# --- ray-cluster.yaml ----------------------------------------------------------------------


def test_ray_cluster_yaml_passes_rays_own_validation():
    """Ray's schema (ray/autoscaler/ray-schema.json of the installed Ray), then what `ray up`
    itself does with the file before it touches AWS: fill in the defaults and validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(REPO / "ray-cluster.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))


def test_ray_cluster_yaml_node_types_images_and_bounds():
    config = _load(REPO / "ray-cluster.yaml")
    images = _images_from_dockerfile()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head runs no tasks or actors"
    assert config["docker"]["image"] == images["cpu"]
    assert config["idle_timeout_minutes"] > 0
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert config["max_workers"] == sum(t["max_workers"] for t in workers.values())
    kinds = {}
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"], name
        node = NODE_TYPES[t["node_config"]["InstanceType"]]
        kinds[name] = node
        worker_image = t.get("docker", {}).get("worker_image", config["docker"]["image"])
        assert worker_image == (images["cuda"] if node.gpus else images["cpu"]), name
    families = {n.name.split(".")[0] for n in kinds.values()}
    assert {"g5", "p4d"} <= families and any(n.gpus == 0 for n in kinds.values())
    # nothing is installed on the nodes: the image has it all
    for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                "worker_setup_commands"):  # fmt: skip
        assert config.get(key, []) == [], key
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert "~/.ray/auth_token" in config["file_mounts"], "every node needs the cluster token"
    [tokens] = [o for o in config["docker"]["run_options"] if "CCS_SERVICE_TOKENS=" in o]
    mounted = tokens.split("=", 1)[1].replace("/home/ray/", "~/")  # the image's HOME
    assert mounted in config["file_mounts"], "the service's digests file is on every node"


# --- one image pair, one Ray version ---------------------------------------------------------


def test_images_match_across_every_manifest_and_the_dockerfile():
    images = _images_from_dockerfile()
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert images["cpu"].endswith(f":{version}") and images["cuda"].endswith(f":{version}-cuda")
    seen = set()
    for path in KUBE:
        for pod in _pods(path):
            want = images["cuda"] if pod.gpus else images["cpu"]
            assert pod.container["image"] == want, pod.where
            seen.add(pod.container["image"])
    assert seen == set(images.values())


def test_ray_version_everywhere_is_the_pinned_one():
    pinned = _pinned("ray")
    assert pinned == ray.__version__
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(re.fullmatch(rf"ray\[[\w,]+\]=={re.escape(pinned)}", d) for d in deps), deps
    for path in KUBE:
        assert _cluster_spec(_load(path))["rayVersion"] == pinned, path.name
    # the image installs Ray only through the constraints
    text = (REPO / "infra/Dockerfile").read_text()
    assert "pip install -c constraints.txt ." in text and "ray==" not in text


# --- Ray token auth, GPU pods, resources ----------------------------------------------------


def test_ray_token_auth_from_the_secret_in_every_ray_container():
    """The variable names are the ones the installed Ray reads (its core library's strings)."""
    from ray._private.authentication.authentication_token_setup import AUTH_MODE_ENV_VAR

    raylet = Path(ray._raylet.__file__).read_bytes()
    assert AUTH_MODE_ENV_VAR == "RAY_AUTH_MODE" and b"RAY_AUTH_TOKEN\x00" in raylet
    for path in KUBE:
        doc = _load(path)
        containers = [(p.where, p.container) for p in _pods(path)]
        spec = _cluster_spec(doc)
        if spec.get("enableInTreeAutoscaling"):
            containers.append((f"{path.name}: autoscaler", spec["autoscalerOptions"]))
        for where, c in containers:
            env = _env(c)
            assert env.get("RAY_AUTH_MODE") == "token", where
            assert env.get("RAY_AUTH_TOKEN") == {"secretKeyRef": TOKEN_SECRET}, where


def test_pods_have_resources_and_gpu_pods_fit_their_instance_type():
    for path in KUBE:
        for pod in _pods(path):
            res = pod.container["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res[kind]), (pod.where, kind)
            if not pod.gpus:
                assert "tolerations" not in pod.spec, pod.where
                continue
            assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
            tolerations = pod.spec.get("tolerations", [])
            assert any(t["key"] == "nvidia.com/gpu" for t in tolerations), pod.where
            node = NODE_TYPES[pod.spec["nodeSelector"]["node.kubernetes.io/instance-type"]]
            assert pod.gpus == node.gpus, pod.where
            assert pod.cpus <= node.vcpus - 2, pod.where  # room for the kubelet and daemons
            assert _gib(pod.limits["memory"]) <= node.memory_gib * 0.9, pod.where
    for pod in _pods(REPO / "infra/raycluster.yaml") + _pods(REPO / "infra/rayservice.yaml"):
        if "nodeSelector" in pod.spec:
            node = NODE_TYPES[pod.spec["nodeSelector"]["node.kubernetes.io/instance-type"]]
            assert pod.cpus <= node.vcpus - 2, pod.where


# --- RayJobs: entrypoints and capacity --------------------------------------------------------


def _job_module(entrypoint: str) -> tuple[str, list[str]]:
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs."), entrypoint
    return argv[2], argv[3:]


def _entrypoint_config(path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Any, type]:
    """Run the RayJob's entrypoint through its job's own ``main`` (argument parser, config
    loading and validation), stopping just before Ray starts; returns the module, the config
    and the job's config model."""
    doc = _load(path)
    module_name, args = _job_module(doc["spec"]["entrypoint"])
    monkeypatch.setattr(sys, "path", [*sys.path, str(REPO)])  # the image's WORKDIR
    module = importlib.import_module(module_name)
    captured: dict[str, Any] = {}
    real_run_job = module.run_job

    def run_job(prog, description, model, run, summary, argv=None, flags=(), **kw):
        def fake_run(cfg):
            captured["config"], captured["model"] = cfg, model

        kw.pop("check", None)  # it reads the production store
        return real_run_job(prog, description, model, fake_run, lambda _: "ok", argv, flags, **kw)

    monkeypatch.setattr(module, "run_job", run_job)
    monkeypatch.setattr("smartccs.raycluster.init_ray", lambda address=None: None)
    monkeypatch.chdir(REPO)  # config paths are relative to the WORKDIR
    assert module.main(args) == 0, f"{path.name}: {doc['spec']['entrypoint']}"
    return module_name, captured["config"], captured["model"]


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_entrypoint_parses_with_its_job_and_config(path: Path, monkeypatch):
    """The entrypoint's module exists, its own parser takes the arguments and the config file
    validates against the job's model; the config's store is the one the pods are given."""
    _, cfg, model = _entrypoint_config(path, monkeypatch)
    assert isinstance(cfg, model)
    env = _env(_pods(path)[0].container)
    assert cfg.store.uri == env["CCS_STORE"], "the config's store and the pods' CCS_STORE differ"


def _actors(module: str, cfg: Any) -> list[list[tuple[float, float]]]:
    """Phases of a job, each the (cpus, gpus) of every actor that must be up at once."""

    def scorers(pool, stream) -> list[tuple[float, float]]:
        shapes = [(pool.cpus, pool.gpus)] * pool.actors + [(stream.planner_cpus, 0.0)]
        return shapes + ([] if pool.fused else [(stream.reader_cpus, 0.0)])

    def trainers(scaling) -> list[tuple[float, float]]:
        gpus = scaling.gpus_per_worker if scaling.use_gpu else 0.0
        return [(scaling.cpus_per_worker, gpus)] * scaling.num_workers

    if module == "jobs.screen":
        return [scorers(cfg.screening.scorers, cfg.screening.stream)]
    if module == "jobs.finetune_classifier":
        return [scorers(cfg.scorers, cfg.stream), trainers(cfg.scaling)]
    # pretrain, detector: the workers and the tile stream feeding them, at once
    stream = [(cfg.stream.planner_cpus, 0.0), (cfg.stream.reader_cpus, 0.0)]
    return [trainers(cfg.scaling) + stream]


def _fits(actors: list[tuple[float, float]], nodes: list[tuple[float, float]]) -> bool:
    """First-fit decreasing of actors onto nodes' free (cpus, gpus)."""
    free = [list(n) for n in nodes]
    for cpus, gpus in sorted(actors, key=lambda a: (a[1], a[0]), reverse=True):
        for node in free:
            if node[0] >= cpus - 1e-9 and node[1] >= gpus - 1e-9:
                node[0] -= cpus
                node[1] -= gpus
                break
        else:
            return False
    return True


def _worker_nodes(spec: dict[str, Any], key: str) -> list[tuple[float, float]]:
    nodes = []
    for g in spec["workerGroupSpecs"]:
        pod = Pod(g["groupName"], g["template"]["spec"])
        nodes += [(pod.cpus, float(pod.gpus))] * int(g[key])
    return nodes


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_cluster_holds_the_actors_its_config_asks_for(path: Path, monkeypatch):
    module_name, cfg, _ = _entrypoint_config(path, monkeypatch)
    spec = _cluster_spec(_load(path))
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for g in spec["workerGroupSpecs"]:  # a job's cluster does not scale: all of it from the start
        assert g["replicas"] == g["minReplicas"] == g["maxReplicas"], g["groupName"]
    nodes = _worker_nodes(spec, "replicas")
    for phase in _actors(module_name, cfg):
        assert _fits(phase, nodes), f"{path.name}: {phase} does not fit on {nodes}"


# --- RayService ----------------------------------------------------------------------------


def _embedded_serve_config() -> tuple[str, dict[str, Any]]:
    text = _load(REPO / RAYSERVICE)["spec"]["serveConfigV2"]
    return text, yaml.safe_load(text)


def test_rayservice_serve_config_is_serve_config_yaml_with_the_cluster_values():
    assert sync_rayservice(REPO, check=True) is False  # the committed manifest is up to date
    _, embedded = _embedded_serve_config()
    serve = _load(REPO / SERVE_CONFIG)
    overrides = _load(REPO / OVERRIDES)
    assert embedded == cluster_serve_config(serve, overrides)
    # the same application: only values differ
    for key in ("proxy_location", "http_options"):
        assert embedded[key] == serve[key]
    [app], [base] = embedded["applications"], serve["applications"]
    for key in ("name", "route_prefix", "import_path"):
        assert app[key] == base[key]
    assert [d["name"] for d in app["deployments"]] == [d["name"] for d in base["deployments"]]
    # every value serve/config.yaml sets is either kept or named in the overrides
    over_args = overrides["applications"][0]["args"]
    for key, value in base["args"].items():
        assert app["args"][key] == value or key in over_args, key
    ServiceConfig.model_validate(app["args"])
    # the same file, for `serve deploy` on a cluster started with `ray up`
    res = run_ccs("deploy", "rayservice", "--print", "--repo", str(REPO))
    assert res.returncode == 0, res.stderr
    assert yaml.safe_load(res.stdout) == embedded


def test_a_drifted_rayservice_is_caught_and_the_overrides_cannot_reshape_the_app(tmp_path: Path):
    for rel in (SERVE_CONFIG, OVERRIDES, RAYSERVICE):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, tmp_path / rel)
    serve = tmp_path / SERVE_CONFIG
    serve.write_text(serve.read_text().replace("poll_s: 2", "poll_s: 3"))
    with pytest.raises(ServeConfigError, match="out of date"):
        sync_rayservice(tmp_path, check=True)
    res = run_ccs("deploy", "rayservice", "--check", "--repo", str(tmp_path))
    assert_one_line_error(res, "out of date")
    assert sync_rayservice(tmp_path) is True  # regenerated
    assert "poll_s: 3" in _load(tmp_path / RAYSERVICE)["spec"]["serveConfigV2"]
    assert sync_rayservice(tmp_path, check=True) is False
    text = (tmp_path / RAYSERVICE).read_text()
    assert text.splitlines()[:20] == (REPO / RAYSERVICE).read_text().splitlines()[:20]
    over = tmp_path / OVERRIDES
    over.write_text(over.read_text() + "      - name: Extra\n        num_replicas: 1\n")
    with pytest.raises(ServeConfigError, match="Extra"):
        sync_rayservice(tmp_path, check=True)


def test_rayservice_cluster_holds_the_service_at_its_peak():
    """At most Screener replicas x workers_per_replica batches run at once, each with its own
    scorer pool (and reader actors): the autoscaled cluster must hold them all."""
    doc = _load(REPO / RAYSERVICE)
    spec = doc["spec"]["rayClusterConfig"]
    assert spec["enableInTreeAutoscaling"] is True
    _, embedded = _embedded_serve_config()
    [app] = embedded["applications"]
    cfg = ServiceConfig.model_validate(app["args"])
    deployments = {d["name"]: d for d in app["deployments"]}
    batches = deployments["Screener"]["num_replicas"] * cfg.workers_per_replica
    pool, stream = cfg.screening.scorers, cfg.screening.stream
    per_batch = [(pool.cpus, pool.gpus)] * pool.actors + [(stream.planner_cpus, 0.0)]
    if not pool.fused:
        per_batch.append((stream.reader_cpus, 0.0))
    adapters = deployments["Adapters"]["autoscaling_config"]["max_replicas"]
    actors = per_batch * batches + [(0.1, 0.0)] * adapters
    for g in spec["workerGroupSpecs"]:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
    assert _fits(actors, _worker_nodes(spec, "maxReplicas"))
    assert pool.gpus > 0, "the service's scorers run on the GPU group"


# --- the image -----------------------------------------------------------------------------


def test_dockerfile_pins_its_bases_and_installs_the_repository_as_the_manifests_expect():
    text = (REPO / "infra/Dockerfile").read_text()
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    minor = re.search(r">=(\d+\.\d+)", requires)[1]
    [python_image] = re.findall(r"ARG PYTHON_IMAGE=(\S+)", text)
    assert re.fullmatch(rf"python:{re.escape(minor)}\.\d+-slim-\w+(@sha256:[0-9a-f]{{64}})?",
                        python_image), python_image  # fmt: skip
    assert "latest" not in re.findall(r"^FROM .*", text, re.M)[0]
    targets = re.findall(r"^FROM \S+ AS (\w+)$", text, re.M)
    assert targets == ["base", "cpu", "cuda"]
    cpu, cuda = text.split("FROM base AS cpu")[1].split("FROM base AS cuda")
    # CPU nodes: torch's CPU build of the pinned version; GPU nodes: the pinned CUDA build
    assert "download.pytorch.org/whl/cpu" in text and "+cpu" in cpu
    assert "s/^torch==//p' constraints.txt" in cpu and "s/^torchvision==//p' constraints.txt" in cpu
    assert "whl/cpu" not in cuda and "NVIDIA_VISIBLE_DEVICES=all" in cuda
    for stage in (cpu, cuda):
        assert "pip install -c constraints.txt ." in stage
        for src in ("platform", "jobs", "serve"):
            assert f"COPY {src} ./{src}" in stage
    [workdir] = re.findall(r"^WORKDIR (\S+)$", text, re.M)
    assert f"ENV PYTHONPATH={workdir}" in text, "serve.app and jobs.* import in every Ray worker"
    lines = (REPO / "infra/Dockerfile.dockerignore").read_text().splitlines()
    ignore = [x.strip() for x in lines if x.strip() and not x.startswith("#")]
    assert ignore[0] == "*"
    for needed in (
        "pyproject.toml",
        "README.md",
        "constraints.txt",
        "platform/",
        "jobs/",
        "serve/",
    ):
        assert f"!{needed}" in ignore, needed
