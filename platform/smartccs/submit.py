"""Submitting a job entrypoint (``python -m jobs.<name>``) to a Ray cluster's job server.

``submit_job`` is what ``ccs submit`` calls, and it is ``ray job submit --working-dir . --
python -m jobs.<name> --config ...`` with the checks done first: the entrypoint module and the
config must exist. A config that Ray uploads with the working directory is named by its
relative path; one from anywhere else (or from a part of it the upload leaves out, such as a
local store or a ``.gitignore``'d folder) travels as its text in the job's environment variable
``CONFIG_ENV``, which the job reads with ``--config env:CCS_JOB_CONFIG``
(``smartccs.jobrunner``). The working directory (the repository root by default) is uploaded
without what is big or local (``WORKING_DIR_EXCLUDES``: the venv, ``.git``, local stores and
cohorts, slides, weights) to stay under Ray's package size limit (the gRPC message size,
512 MiB).

Address: the ``address`` argument, else ``$RAY_API_SERVER_ADDRESS`` or ``$RAY_ADDRESS``, else
``http://127.0.0.1:8265``. An ``http(s)://`` address is the job server itself; a bare
``host:port`` is a cluster's GCS, whose job server Ray looks up. Ray's SDK lets those two
variables override an explicit address (``ray/dashboard/utils.py``,
``get_address_for_submission_client``); here the argument wins, as for every other option.

Token authentication (Ray 2.60, read in the installed source):

- The job server checks ``Authorization: Bearer <token>`` (or ``X-Ray-Authorization``, or the
  ``ray-authentication-token`` cookie) on every request when the cluster runs with
  ``RAY_AUTH_MODE=token``: 401 without a token, 403 with a wrong one
  (``ray/_private/authentication/http_token_authentication.py``, ``token_auth_middleware``).
- ``JobSubmissionClient`` adds that header itself only when the *client* process is in token
  mode, i.e. ``RAY_AUTH_MODE=token`` in its environment, and only if the caller passed no
  ``Authorization`` header of its own (``ray/dashboard/modules/dashboard_sdk.py``,
  ``SubmissionClient.__init__``: ``self._headers.update(**get_auth_headers_if_auth_enabled(
  self._headers))``; ``get_auth_headers_if_auth_enabled`` returns ``{}`` unless
  ``ray/_private/authentication/authentication_utils.py::is_token_auth_enabled``). The log tail
  websocket (``JobSubmissionClient.tail_job_logs``) sends the same headers.
- The token comes from ``RAY_AUTH_TOKEN``, else the file named by ``RAY_AUTH_TOKEN_PATH``, else
  ``~/.ray/auth_token`` (C++ ``AuthenticationTokenLoader``, exposed as
  ``ray._raylet.AuthenticationTokenLoader``; Ray's token-auth docs give the same order).
- "On by default" in Ray 2.60 means: a cluster started by ``ray.init()`` enables token mode
  when ``RAY_AUTH_MODE`` is unset and writes a token to ``~/.ray/auth_token``
  (``ray/_private/worker.py``: ``enable_token_auth_by_default`` then
  ``ensure_token_if_auth_enabled(create_token_if_missing=True)``); ``ray start --head`` enables
  it when a token already exists (``ray/scripts/scripts.py``:
  ``maybe_enable_token_auth_if_token_available``). A client in a fresh shell, though, is not in
  token mode, so a bare ``ray job submit`` to such a cluster gets 401.

- The job server says which mode it runs in, without a token: ``GET /api/authentication_mode``
  answers ``{"authentication_mode": "token"}`` or ``"disabled"`` (``ray/dashboard/
  http_server_head.py``, one of its ``public_exact_paths``).

So here: with ``RAY_AUTH_MODE`` set (``token`` or ``disabled``), Ray's own behaviour applies
unchanged. With it unset, ``ccs submit`` asks the job server its mode and, in token mode,
sends the token from Ray's own sources itself (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``,
``~/.ray/auth_token``; the file ``ray get-auth-token --generate`` writes, which
``ray-cluster.yaml`` mounts on every node), or says that none was found, before uploading
anything. Where the server cannot say (an older Ray, a ``host:port`` GCS address), the token is
sent when the user gave one explicitly (``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``) or when
the job server is on this machine, where a local cluster's token is in ``~/.ray/auth_token``
(the rule ``ray.init`` itself applies to a local cluster it finds, ``ray/_private/worker.py``:
"Only a local cluster found automatically auto-enables auth"). Authentication is never turned
off. On KubeRay, the token is a Kubernetes Secret passed as ``RAY_AUTH_TOKEN`` with
``RAY_AUTH_MODE=token`` (``infra/rayjob-*.yaml``).

Two things about a local cluster, also from the source: the job server hands each job to the
head node's dashboard agent, on a fixed port (52365, ``ray_constants``), so while a second Ray
on the same machine holds it the server answers "No available agent" (retried here for
``AGENT_WAIT_S``); and the job's driver gets the GCS address named in the cluster's temp dir
(``ray_current_cluster``, written by ``ray start``), else the first GCS it finds among the
machine's raylet processes (``job_supervisor.py``, ``_get_driver_env_vars``), which may be
another cluster's. One Ray per machine avoids both (so does ``ray start --temp-dir DIR
--dashboard-agent-listen-port PORT``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import re
import shlex
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse
from urllib.request import urlopen

import yaml
from pydantic import BaseModel, ConfigDict

from smartccs.errors import CCSError
from smartccs.jobrunner import ENV_PREFIX
from smartccs.logs import ray_output_env

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

log = logging.getLogger(__name__)
_quiet = logging.getLogger(f"{__name__}.packaging")  # Ray's matchers log each ignore file read
_quiet.propagate = False
_quiet.addHandler(logging.NullHandler())

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
JOBS_PACKAGE = "jobs"
REPO_ROOT = Path(__file__).resolve().parents[2]
"""The checkout this library lives in (``platform/smartccs/submit.py``), when installed editable."""

WORKING_DIR_EXCLUDES = [
    ".venv",
    ".git",
    "ccs-data",
    "ccs-cohort",
    "bench/out",
    ".cache",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "*.svs",
    "*.tiff",
    "*.tif",
    "*.safetensors",
    "*.pt",
]
"""gitignore-style patterns left out of the uploaded working directory (Ray ``excludes``)."""

DRIVER_ENV_KEYS = frozenset({"OMP_NUM_THREADS", *ray_output_env(verbose=False)})
"""Set by ``smartccs.raycluster.init_ray`` in the driver's own runtime env: Ray refuses to merge
a job runtime env that sets the same variable, so a job cannot take them from ``extra_env``
(Ray Data's output follows the job's ``-v``: ``verbose``)."""

CONFIG_ENV = "CCS_JOB_CONFIG"
"""The job's environment variable that carries a config from outside the working directory."""
CONFIG_MAX_BYTES = 64 << 10
"""Largest config shipped in ``CONFIG_ENV`` (Linux takes one variable up to 128 KiB)."""
AUTH_MODE_PATH = "/api/authentication_mode"
AUTH_PROBE_S = 10.0

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_S = 60.0
"""How long to retry a job server that has no job agent yet (a cluster just started: its nodes'
dashboard agents register a few seconds after the head; the server answers 500 until then)."""
_NO_AGENT = "No available agent to submit job"
_NAME = re.compile(r"[a-z][a-z0-9_]*")
_POLL_S = 1.0


class SubmittedJob(BaseModel):
    """A job handed to a Ray job server, and its status when ``submit_job`` returned."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    address: str
    entrypoint: str
    status: str


def default_working_dir() -> Path:
    """The repository root of this checkout if it has the job entrypoints, else the cwd."""
    return REPO_ROOT if (REPO_ROOT / JOBS_PACKAGE / "__init__.py").is_file() else Path.cwd()


def resolve_address(address: str | None = None) -> str:
    """The argument, else ``$RAY_API_SERVER_ADDRESS`` / ``$RAY_ADDRESS``, else the local default."""
    return (
        address
        or os.environ.get("RAY_API_SERVER_ADDRESS")
        or os.environ.get("RAY_ADDRESS")
        or DEFAULT_ADDRESS
    ).rstrip("/")


def available_jobs(working_dir: Path) -> list[str]:
    return sorted(
        p.stem for p in (working_dir / JOBS_PACKAGE).glob("*.py") if _NAME.fullmatch(p.stem)
    )


def _uploaded(rel: Path, working_dir: Path) -> bool:
    """Whether Ray uploads ``working_dir/rel`` with the working dir: not matched by Ray's
    default excludes, ``WORKING_DIR_EXCLUDES`` or a ``.gitignore`` / ``.rayignore`` on the way
    (Ray's own matchers, walked as ``ray/_private/runtime_env/packaging.py::_dir_travel``)."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import _get_excludes, get_excludes_from_ignore_files

    gitignore = os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    patterns = ray_constants.get_runtime_env_default_excludes() + WORKING_DIR_EXCLUDES
    excludes = [_get_excludes(working_dir, patterns)]
    path = working_dir
    for part in ("", *rel.parts):
        path = path / part if part else path
        excludes += get_excludes_from_ignore_files(path, gitignore, logger=_quiet)
        if any(exclude(path) for exclude in excludes):
            return False
    return True


def _config_in(config: Path, working_dir: Path) -> Path | None:
    """The config's path relative to the working directory, None when it does not travel
    with it (outside it, or left out of the upload)."""
    try:
        rel = Path(config).expanduser().resolve().relative_to(working_dir)
    except ValueError:
        return None
    return rel if _uploaded(rel, working_dir) else None


def config_env(config: Path | str, working_dir: Path | str) -> dict[str, str]:
    """``{CONFIG_ENV: <its YAML>}`` for a config that does not travel with the working
    directory (outside it, or excluded from the upload), else ``{}``; the text must be a YAML
    mapping of a shippable size."""
    working_dir = Path(working_dir).expanduser().resolve()
    if _config_in(Path(config), working_dir) is not None:
        return {}
    data = Path(config).expanduser().read_bytes()
    if len(data) > CONFIG_MAX_BYTES:
        raise CCSError(
            f"config {config} is {len(data)} bytes, more than the {CONFIG_MAX_BYTES} that travel "
            f"in the job's environment; put it under the working directory {working_dir}"
        )
    try:
        text = data.decode()
        raw = yaml.safe_load(text)
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CCSError(f"config {config}: not YAML text ({exc})".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise CCSError(f"config {config}: expected a mapping of config fields")
    return {CONFIG_ENV: text}


def job_entrypoint(
    name: str, config: Path, working_dir: Path, *, store: str | None = None, verbose: int = 0
) -> str:
    """``python -m jobs.<name> --config <path in working_dir, or env:CCS_JOB_CONFIG> [--store
    URI] [-v]``, after checks."""
    working_dir = Path(working_dir).expanduser().resolve()
    if not working_dir.is_dir():
        raise CCSError(f"working directory {working_dir} is not a directory")
    module = working_dir / JOBS_PACKAGE / f"{name}.py"
    if not _NAME.fullmatch(name) or not module.is_file():
        known = ", ".join(available_jobs(working_dir)) or "none"
        raise CCSError(
            f"unknown job {name!r}: no {JOBS_PACKAGE}/{name}.py in {working_dir} (jobs: {known})"
        )
    if not Path(config).expanduser().is_file():
        raise CCSError(f"config {config} not found")
    rel = _config_in(Path(config), working_dir)
    where = rel.as_posix() if rel is not None else f"{ENV_PREFIX}{CONFIG_ENV}"
    args = ["python", "-m", f"{JOBS_PACKAGE}.{name}", "--config", where]
    if store:
        args += ["--store", store]
    if verbose:
        args.append("-" + "v" * verbose)
    return shlex.join(args)


def _is_local(address: str) -> bool:
    host = urlparse(address if "://" in address else f"//{address}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_auth_mode(address: str, timeout: float = AUTH_PROBE_S) -> str | None:
    """What the job server at ``address`` says of its authentication (``token`` or
    ``disabled``; a public endpoint), None when it cannot say (no answer, an older Ray, not an
    ``http(s)://`` address)."""
    if urlparse(address).scheme not in ("http", "https"):
        return None
    try:
        with urlopen(address.rstrip("/") + AUTH_MODE_PATH, timeout=timeout) as reply:
            mode = json.load(reply).get("authentication_mode")
    except (HTTPError, URLError, OSError, ValueError, AttributeError):
        return None
    return mode if mode in ("token", "disabled") else None


def should_send_token(
    address: str, env: Mapping[str, str] | None = None, server_mode: str | None = None
) -> bool:
    """Whether ``submit_job`` passes the token itself, given what the server said of its mode
    (``server_auth_mode``; see the module docstring)."""
    env = os.environ if env is None else env
    if env.get("RAY_AUTH_MODE"):
        return False  # token or disabled: the SDK does what Ray does
    if server_mode is not None:
        return server_mode == "token"
    return bool(env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH")) or _is_local(address)


def auth_headers(address: str) -> dict[str, str]:
    """``{"authorization": "Bearer <token>"}`` when it is ours to send and a token exists; a
    ``CCSError`` when the server wants one and there is none."""
    if os.environ.get("RAY_AUTH_MODE"):
        return {}
    mode = server_auth_mode(address)
    if not should_send_token(address, server_mode=mode):
        return {}
    from ray._raylet import AuthenticationTokenLoader
    from ray.exceptions import AuthenticationError

    # Ray's own loader: RAY_AUTH_TOKEN, else RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token
    try:
        loader = AuthenticationTokenLoader.instance()
        headers = dict(loader.get_token_for_http_header(ignore_auth_mode=True))
    except AuthenticationError as exc:  # e.g. RAY_AUTH_TOKEN_PATH names a missing file
        raise CCSError(str(exc).split(". Note:")[0].strip()) from None
    if not headers and mode == "token":
        raise CCSError(
            f"the Ray job server at {address} uses token authentication and no token was found "
            "here: set RAY_AUTH_TOKEN=<token> or RAY_AUTH_TOKEN_PATH=<file>, or put the "
            "cluster's token in ~/.ray/auth_token (`ray get-auth-token` on a node prints it)"
        )
    return headers


@contextlib.contextmanager
def _without_env(*names: str) -> Iterator[None]:
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _client(address: str) -> JobSubmissionClient:
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        # the SDK would let these variables override an explicit address
        with _without_env("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
            return JobSubmissionClient(address, headers=auth_headers(address))
    except AuthenticationError as exc:
        raise CCSError(_auth_hint(address, exc)) from None
    except ConnectionError as exc:
        raise CCSError(
            f"cannot reach a Ray job server at {address} ({exc}); is the cluster up "
            "(`ray start --head`, or `kubectl port-forward svc/<cluster>-head-svc 8265`)?"
        ) from None


def _auth_hint(address: str, exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"Ray job server at {address} refused the request ({first}); give the cluster's token: "
        "RAY_AUTH_MODE=token with RAY_AUTH_TOKEN=<token> or RAY_AUTH_TOKEN_PATH=<file> "
        "(a local cluster's is in ~/.ray/auth_token; `ray get-auth-token`)"
    )


def _job_id(name: str) -> str:
    return f"ccs-{name.replace('_', '-')}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


async def _tail(client: JobSubmissionClient, job_id: str, out: TextIO) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def _wait(client: JobSubmissionClient, job_id: str, follow_logs: bool, out: TextIO) -> str:
    if follow_logs:
        try:
            asyncio.run(_tail(client, job_id, out))
        except RuntimeError as exc:  # the websocket closed early: the status still tells
            log.warning("log stream of job %s ended early: %s", job_id, exc)
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        time.sleep(_POLL_S)


def _job_env_vars(
    config: Path | str, working_dir: Path, extra_env: Mapping[str, str] | None
) -> dict[str, str]:
    """The job's environment variables: ``extra_env`` and the config when it does not travel
    with the working directory; refused where they would set what the driver or the config
    sets itself."""
    shipped = config_env(config, working_dir)
    env = dict(extra_env or {})
    clash = sorted(DRIVER_ENV_KEYS & env.keys())
    if clash:
        raise CCSError(f"extra_env: {', '.join(clash)} is set by the job driver itself")
    if shipped.keys() & env.keys():
        raise CCSError(f"extra_env: {CONFIG_ENV} carries the config {config} itself")
    if shipped:
        log.info("config %s is not uploaded with %s: it travels in the job's %s", config,
                 working_dir, CONFIG_ENV)  # fmt: skip
    return {"PYTHONUNBUFFERED": "1", **env, **shipped}


def _hand_over(
    client: JobSubmissionClient,
    address: str,
    name: str,
    entrypoint: str,
    runtime_env: dict[str, Any],
) -> str:
    """Submit the job and return its id, retrying for ``AGENT_WAIT_S`` while the server has
    no job agent yet; any other refusal is a ``CCSError`` with the server's first line."""
    from ray.exceptions import AuthenticationError

    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(
                entrypoint=entrypoint,
                submission_id=_job_id(name),
                runtime_env=runtime_env,
                metadata={"ccs_job": name},
            )
        except AuthenticationError as exc:
            raise CCSError(_auth_hint(address, exc)) from None
        except (RuntimeError, ValueError) as exc:  # the server's or the packaging's refusal
            if _NO_AGENT in str(exc) and time.monotonic() < deadline:
                log.info("job server at %s has no job agent yet; retrying", address)
                time.sleep(2)
                continue
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CCSError(
                f"Ray job server at {address} did not take job {name!r}: {first}"
            ) from None


def _succeeded(
    client: JobSubmissionClient, job_id: str, address: str, follow_logs: bool, out: TextIO
) -> str:
    """Wait for the job to end and return its status; a ``CCSError`` with its reason and how
    to read its logs unless it SUCCEEDED. Interrupted, it says the job keeps running."""
    logs_hint = f"ray job logs {job_id} --address {address}"
    try:
        status = _wait(client, job_id, follow_logs, out)
    except KeyboardInterrupt:
        print(
            f"stopped following job {job_id}; it keeps running (`ray job stop {job_id} "
            f"--address {address}` ends it, `{logs_hint}` shows its logs)",
            file=sys.stderr,
        )
        raise
    if status != "SUCCEEDED":
        message = (client.get_job_info(job_id).message or "").strip()
        reason = message.splitlines()[0].split(", last available logs")[0] if message else ""
        raise CCSError(
            f"job {job_id} {status}{': ' + reason if reason else ''} (logs: `{logs_hint}`)"
        )
    return status


def submit_job(
    name: str,
    config: Path | str,
    address: str | None = None,
    *,
    store: str | None = None,
    working_dir: Path | str | None = None,
    wait: bool = True,
    follow_logs: bool = True,
    extra_env: Mapping[str, str] | None = None,
    out: TextIO | None = None,
    verbose: int = 0,
) -> SubmittedJob:
    """Submit ``jobs/<name>.py`` with ``config``; with ``wait``, return once it has finished.

    ``working_dir`` (default: this repository's root) is uploaded and becomes the job's
    current directory; a ``config`` it does not carry travels in the job's ``CONFIG_ENV``.
    ``extra_env`` goes into the job's runtime env. With ``follow_logs`` the job's output is
    streamed to ``out`` (stdout);
    ``verbose`` (``ccs -v submit``) passes ``-v`` on to the job, for Ray's own progress output.
    A job that ends other than SUCCEEDED raises ``CCSError`` naming it and how to read its logs.
    """
    working_dir = Path(working_dir or default_working_dir()).expanduser().resolve()
    entrypoint = job_entrypoint(name, Path(config), working_dir, store=store, verbose=verbose)
    env_vars = _job_env_vars(config, working_dir, extra_env)
    address = resolve_address(address)
    client = _client(address)
    runtime_env = {
        "working_dir": str(working_dir),
        "excludes": list(WORKING_DIR_EXCLUDES),
        "env_vars": env_vars,
    }
    job_id = _hand_over(client, address, name, entrypoint, runtime_env)
    log.info("submitted %s to %s: %s", job_id, address, entrypoint)
    if not wait:
        status = str(client.get_job_status(job_id).value)
    else:
        status = _succeeded(client, job_id, address, follow_logs, out or sys.stdout)
    return SubmittedJob(job_id=job_id, address=address, entrypoint=entrypoint, status=status)
