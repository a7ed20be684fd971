"""serve/config.yaml and infra/rayservice.yaml: valid for Ray Serve, and their args valid for
the service, so a typo fails here rather than at `serve deploy`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from smartccs.service.config import ServiceConfig

REPO = Path(__file__).resolve().parents[1]


def _serve_configs() -> dict[str, dict]:
    local = yaml.safe_load((REPO / "serve/config.yaml").read_text())
    service = yaml.safe_load((REPO / "infra/rayservice.yaml").read_text())
    return {"serve/config.yaml": local, "infra/rayservice.yaml": yaml.safe_load(
        service["spec"]["serveConfigV2"])}  # fmt: skip


@pytest.mark.parametrize("name", ["serve/config.yaml", "infra/rayservice.yaml"])
def test_serve_config_is_valid_for_serve_and_the_service(name):
    raw = _serve_configs()[name]
    schema = ServeDeploySchema.model_validate(raw)
    [app] = schema.applications
    assert app.import_path == "serve.app:build"
    cfg = ServiceConfig.model_validate(app.args)
    assert cfg.screening.adapt.method == "smartccs"
    names = {d.name for d in app.deployments}
    assert names == {"Ingress", "Screener", "Adapters"}, "names must match the deployments"


def test_the_serve_door_builds_the_application():
    import sys

    from ray.serve import Application

    sys.path.append(str(REPO))  # as `serve run` does with its --app-dir (the repo root)
    from serve.app import build

    args = _serve_configs()["serve/config.yaml"]["applications"][0]["args"]
    assert isinstance(build(args), Application)


def test_a_client_resolves_the_services_root_paths_on_the_url_it_called():
    from smartccs.service.client import absolute

    assert absolute("http://127.0.0.1:8000/", "/v1/batches/b-1") == (
        "http://127.0.0.1:8000/v1/batches/b-1"
    )
    assert absolute("https://x.org/ccs", "/v1/batches/b-1") == "https://x.org/ccs/v1/batches/b-1"
    assert absolute("http://a", "https://public.org/v1/batches/b-1") == (
        "https://public.org/v1/batches/b-1"
    )
