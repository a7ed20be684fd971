"""infra/rayservice.yaml's ``serveConfigV2``, generated from serve/config.yaml.

serve/config.yaml is the one definition of the service's Serve application (import path,
deployments, args). The cluster differs from a laptop only in values: an S3 store, GPU scorers,
more replicas. Those values live in infra/serve-overrides.yaml, and ``ccs deploy rayservice``
writes serve/config.yaml merged with them into the RayService, so the two cannot drift: a test
fails when the committed manifest is not what the command would write.

The overrides may change values, never the application's shape: no new application or
deployment, and no other import path or route.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from smartccs.errors import CCSError

SERVE_CONFIG = "serve/config.yaml"
OVERRIDES = "infra/serve-overrides.yaml"
RAYSERVICE = "infra/rayservice.yaml"

FIXED_APP_FIELDS = ("import_path", "route_prefix")
"""What an override may not change: the application the cluster runs is serve/'s."""


class ServeConfigError(CCSError):
    """The overrides would change the application's shape, or the manifest cannot be updated."""


def merge(base: Any, over: Any, where: str = "") -> Any:
    """``over`` laid onto ``base``: mappings merge key by key, lists of named mappings merge by
    ``name`` (each name in ``over`` must exist in ``base``), anything else is replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            out[key] = merge(base[key], value, f"{where}.{key}") if key in base else value
        return out
    if _named_list(base) and _named_list(over):
        known = {item["name"]: item for item in base}
        unknown = [item["name"] for item in over if item["name"] not in known]
        if unknown:
            raise ServeConfigError(
                f"{OVERRIDES}: {where.lstrip('.')} names {unknown}, which {SERVE_CONFIG} "
                "does not define; overrides change values, not the application's shape"
            )
        patches = {item["name"]: item for item in over}
        return [
            merge(item, patches[item["name"]], f"{where}[{item['name']}]")
            if item["name"] in patches
            else item
            for item in base
        ]
    return over


def _named_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(i, dict) and "name" in i for i in value)


def cluster_serve_config(serve_config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """serve/config.yaml's content with the cluster's values laid over it."""
    for app in overrides.get("applications", []):
        fixed = [f for f in FIXED_APP_FIELDS if f in app]
        if fixed:
            raise ServeConfigError(f"{OVERRIDES}: {fixed} of {app.get('name')} cannot be changed")
    return merge(serve_config, overrides)


def render(config: dict[str, Any]) -> str:
    """The YAML text embedded as ``serveConfigV2`` (stable: key order as in serve/config.yaml)."""
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=100)


_BLOCK = re.compile(r"^(?P<indent> *)serveConfigV2: \|[-+]?\s*$")


def embed(manifest: str, serve_text: str) -> str:
    """``manifest`` (the RayService YAML text) with its ``serveConfigV2`` block replaced.

    Edits the text rather than re-dumping the manifest, so its comments and anchors stay."""
    lines = manifest.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if _BLOCK.match(line)]
    if len(starts) != 1:
        raise ServeConfigError(f"{RAYSERVICE}: expected one `serveConfigV2: |` block")
    start = starts[0]
    indent = len(_BLOCK.match(lines[start])["indent"])
    end = start + 1
    while end < len(lines) and (
        not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip(" ")) > indent
    ):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():  # keep blank lines after the block
        end -= 1
    pad = " " * (indent + 2)
    block = [pad + line if line.strip() else line for line in serve_text.splitlines(True)]
    return "".join([*lines[: start + 1], *block, *lines[end:]])


def cluster_serve_text(repo: Path) -> str:
    """The cluster's Serve config file: what the RayService embeds, and what `serve deploy`
    takes on a cluster started with `ray up`."""
    serve_config = yaml.safe_load((repo / SERVE_CONFIG).read_text())
    overrides = yaml.safe_load((repo / OVERRIDES).read_text()) or {}
    return render(cluster_serve_config(serve_config, overrides))


def expected_manifest(repo: Path) -> str:
    """What infra/rayservice.yaml must contain, from the files it is generated from."""
    return embed((repo / RAYSERVICE).read_text(), cluster_serve_text(repo))


def sync_rayservice(repo: Path, check: bool = False) -> bool:
    """Bring infra/rayservice.yaml up to date; True if it was (``check``: would be) changed.

    With ``check`` nothing is written and an out-of-date manifest is an error."""
    path = repo / RAYSERVICE
    want = expected_manifest(repo)
    if want == path.read_text():
        return False
    if check:
        raise ServeConfigError(
            f"{RAYSERVICE}: serveConfigV2 is out of date with {SERVE_CONFIG} + {OVERRIDES}; "
            "run `ccs deploy rayservice`"
        )
    path.write_text(want)
    return True
