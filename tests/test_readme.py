"""Every shell and SQL example of the README, run as written on what ``make demo`` leaves.

The README's doors are a tour a new user takes after ``make demo``: here its ```bash and
```sql blocks are parsed and run in README order, in one bash session (variables and exports
carry from line to line, as in a terminal), with the working directory a checkout of the
repository whose ``./ccs-data`` is a store made by the demo's own code path at toy size
(tests/toy_study.py: the real study, its training stages found done with toy models), and
``ccs``, ``ray``, ``serve`` and ``python`` the venv's. Each line must exit 0; the analyst's SQL
runs through DuckDB and must return rows.

What this machine cannot have is stood in for, each named below with its reason:

- ``SKIPPED``: the lines that need a real cloud (AWS machines, Kubernetes) or would rerun the
  13-minute demo itself; where a later line needs what a skipped one leaves, the test makes it
  (a one-machine head for ``ray up``, the toy demo store copied to S3 for the study job);
- ``SUBSTITUTED``: addresses the README names that are another machine's or a fixed port here
  (the job server, the service's public URL) and the demo's batch tag (the toy study's batches
  carry the toy tag);
- ``s3://ccs/prod`` is bucket ``ccs`` on the suite's moto S3 server (the AWS_* variables point
  the shell at it); ``./scans/2026-11-21``, a center's own folder of slides, is two synthetic
  slides; the job configs under ``jobs/configs/`` and ``serve/config.yaml`` are the repository's
  with the toy sizes of ``TOY_JOBS`` and the service's store and port laid over them
  (``service_config``), and the center's token entry added where the README's comment says.

``make demo`` writes ``tiny-n12-s0-a10`` batches; ``test_readme_names_what_the_demo_makes``
checks, without Ray, that the README names the demo's own batch tag and models and that every
skip and substitution still matches a line of the README.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from moto_buckets import moto_s3
from ray_head import free_port, fresh_env, kill_session, ray_head
from toy_study import ToyDemo

from smartccs.jobrunner import deep_merge
from smartccs.store import S3Options, Store, StoreConfig
from smartccs.study.config import StudyConfig

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DEMO_TAG = StudyConfig().batch_tag()  # tiny-n12-s0-a10: the batches `make demo` writes
TOY_TAG = StudyConfig(slides_per_center=4).batch_tag()  # toy_study_config's
PROD = "s3://ccs/prod"

SKIPPED = {
    "make demo": "the demo itself, 13 minutes on 2 cores: the store these lines run on is made "
    "by its code path at toy size (tests/toy_study.py)",
    "make test": "the suite, of which this test is part",
    "ray up ray-cluster.yaml": "starts GPU machines on AWS; in its place the test starts the "
    "one-machine cluster the line's comment names, `ray start --head`, in this shell's "
    "environment (its home holds the token `ray get-auth-token --generate` made)",
    "ray dashboard ray-cluster.yaml &": "forwards the AWS head's job server to this machine; the "
    "one-machine head's job server is reached directly",
    "ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m jobs.demo": (
        "the whole study at demo size, 13 minutes on 2 cores and more on moto; in its place the "
        "test copies the toy demo store to s3://ccs/prod, which is what the line leaves there"
    ),
    "kubectl apply -f infra/rayjob-": "needs a Kubernetes cluster with KubeRay (the manifests "
    "are checked by test_deploy_manifests.py)",
    "ccs models import --store ./ccs-data --encoder weights/": "needs the Smart-CCS release's "
    "files (1.2 GB, not downloadable here); test_models_screen.py runs this import on toy files "
    "in the published formats",
    "ccs screen --batch ./ccs-data/incoming/int-a/tiny-n12-s0-a10-test1 --model smart-ccs-": (
        "screens with the release imported by the line before; test_models_screen.py runs it "
        "with the toy release"
    ),
}
"""README lines (by how they start) that are not run, and why."""

SUBSTITUTED = {
    "http://127.0.0.1:8265": "the one-machine head's job server is on a free port: 8265 may be "
    "another Ray's on this machine",
    "https://screening.example.org": "the service `serve run serve/config.yaml` started, on "
    "this machine at a free port",
    DEMO_TAG: f"the toy study's batches are the demo's with 4 slides per center: {TOY_TAG}",
}
"""Text of the README replaced before a line runs, and why."""

SERVICES = {"serve run serve/config.yaml": "/healthz"}
"""Lines that run until stopped: started in the background, each must answer on this path."""

TOY_STREAM = {"tiling": {"target_mpp": 1.0, "tile_px": 128}, "batch_size": 8}
TOY_JOBS = {
    "pretrain-demo.yaml": {
        "encoder": {
            "kwargs": {
                "img_size": 32,
                "patch_size": 8,
                "embed_dim": 32,
                "depth": 2,
                "num_heads": 2,
            },
        },
        "crops": {
            "global_size": 32,
            "local_size": 16,
            "n_local": 2,
            # the value 'auto' measures on these slides (it reads 256 tiles first)
            "normalization": {"mean": [0.91, 0.89, 0.88], "std": [0.13, 0.12, 0.1]},
        },
        "dino": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16},
        "stream": TOY_STREAM,
        "batch_size": 4,
        "shuffle_buffer": 32,
        "max_steps": 2,
        "checkpoint_every": 2,
    },
    "detector-demo.yaml": {
        "input_px": 64,
        "split": {"test": 0.3},  # 12 slides in strata of 2: one for train, one for test
        "head": {"width": 16},
        "stream": TOY_STREAM,
        "batch_size": 4,
        "eval_batch_size": 16,
        "other_tiles": 0.3,
        "max_steps": 2,
        "checkpoint_every": 2,
    },
    "classifier-demo.yaml": {
        "mil": {"hidden": 16, "top_k": 5},
        "split": {"test": 0.3},
        "stream": TOY_STREAM,
        "batch_size": 2,
        "prototype_slides": 2,
        "threshold_folds": 2,
        "n_boot": 200,
        "max_steps": 2,
        "checkpoint_every": 2,
    },
}
"""What the checkout's job configs lay over the repository's: toy models, a few steps."""

LINE_TIMEOUT_S = 900


@dataclass(frozen=True)
class Example:
    kind: str  # bash | sql
    text: str  # one logical shell line (continuations kept) or one SQL block
    section: str

    @property
    def command(self) -> str:
        """The line on one line, without its trailing comment's padding."""
        return " ".join(self.text.replace("\\\n", " ").split())


def readme_examples(text: str) -> list[Example]:
    """The README's ```bash lines and ```sql blocks, in order, each with its section."""
    examples: list[Example] = []
    section, fence, body = "", None, []
    for line in text.splitlines():
        if fence is None:
            if m := re.fullmatch(r"```(\w*)\s*", line):
                fence, body = m[1], []
            elif m := re.match(r"(?:#+ |\*\*)([^*:]+)", line):
                section = m[1].strip()
            continue
        if not line.startswith("```"):
            body.append(line)
            continue
        if fence == "sql":
            examples.append(Example("sql", "\n".join(body), section))
        elif fence == "bash":
            logical = ""
            for raw in body:
                logical += raw
                if raw.endswith("\\"):
                    logical += "\n"
                    continue
                if logical.strip() and not logical.lstrip().startswith("#"):
                    examples.append(Example("bash", logical.strip(), section))
                logical = ""
        fence = None
    return examples


def skip_reason(example: Example) -> str | None:
    return next((why for start, why in SKIPPED.items() if example.command.startswith(start)), None)


def test_readme_names_what_the_demo_makes():
    """Without Ray: the README's examples name the demo's batches and published classifier,
    and every skip and substitution here still matches the README."""
    examples = readme_examples(README.read_text())
    commands = [e.command for e in examples if e.kind == "bash"]
    for start in SKIPPED:
        assert any(c.startswith(start) for c in commands), f"no README line starts {start!r}"
    for text in SUBSTITUTED:
        assert any(text in e.text for e in examples), f"the README no longer names {text!r}"
    for start in SERVICES:
        assert any(c.startswith(start) for c in commands), f"no README line {start!r}"
    demo_batches = {
        m for c in commands for m in re.findall(r"ccs-data/incoming/[\w.-]+/([\w.-]+)", c)
    }
    assert demo_batches and all(b.startswith(f"{DEMO_TAG}-") for b in demo_batches), demo_batches
    assert any("./ccs-data/models/classifier" in c for c in commands)
    assert [e for e in examples if e.kind == "sql"], "the analyst's SQL"
    names = {e.section for e in examples}
    assert {"Platform engineer", "Screening", "Analyst", "Synthetic cohorts"} <= names, names


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Tour:
    """The checkout, its shell, and what stands in for the machines the README names."""

    root: Path
    checkout: Path
    env: dict[str, str]
    s3_endpoint: str
    service_port: int
    logs: Path
    shell: subprocess.Popen | None = None
    head: str | None = None
    services: list[int] = field(default_factory=list)
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    head_stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    n: int = 0

    # the shell -----------------------------------------------------------------------------
    def start_shell(self) -> None:
        out = (self.logs / "shell.log").open("w")
        self.stack.callback(out.close)
        self.shell = subprocess.Popen(
            ["bash", "--norc", "--noprofile"], stdin=subprocess.PIPE, stdout=out,
            stderr=subprocess.STDOUT, cwd=self.checkout, env=self.env, text=True,
            start_new_session=True,
        )  # fmt: skip
        self.stack.callback(kill_session, self.shell.pid)

    def _send(self, script: str, done: Path, timeout: float) -> None:
        assert self.shell is not None
        self.shell.stdin.write(script)
        self.shell.stdin.flush()
        deadline = time.monotonic() + timeout
        while not done.exists():
            if self.shell.poll() is not None:
                pytest.fail(f"the shell exited ({self.shell.returncode})")
            if time.monotonic() > deadline:
                pytest.fail(f"no answer in {timeout:.0f} s: {script[:300]}")
            time.sleep(0.5)

    def run(self, line: str, timeout: float = LINE_TIMEOUT_S) -> tuple[int, str, str]:
        """Run ``line`` in the shell; its exit status, stdout and stderr."""
        self.n += 1
        out, err, rc = (self.logs / f"{self.n:02d}.{x}" for x in ("out", "err", "rc"))
        script = f"{{\n{line}\n}} </dev/null >{out} 2>{err}\necho $? >{rc}.tmp; mv {rc}.tmp {rc}\n"
        self._send(script, rc, timeout)
        return int(rc.read_text()), out.read_text(), err.read_text()

    def background(self, line: str) -> tuple[int, Path]:
        """Start ``line`` in a session of its own; its pid and its log."""
        self.n += 1
        log, pid = self.logs / f"{self.n:02d}.log", self.logs / f"{self.n:02d}.pid"
        script = (
            f"setsid bash -c {shlex.quote(line)} </dev/null >{log} 2>&1 &\n"
            f"echo $! >{pid}.tmp; mv {pid}.tmp {pid}\n"
        )
        self._send(script, pid, 30)
        return int(pid.read_text()), log

    def shell_env(self) -> dict[str, str]:
        """The shell's exported environment now (the README's `export`s included)."""
        dump = self.logs / f"env-{self.n}"
        self._send(f"env -0 >{dump}.tmp; mv {dump}.tmp {dump}\n", dump, 30)
        return dict(kv.split("=", 1) for kv in dump.read_text().split("\0") if "=" in kv)

    # stand-ins -----------------------------------------------------------------------------
    def start_head(self) -> None:
        """In place of `ray up`: a one-machine cluster from this shell's environment."""
        env = self.shell_env()
        self.head = self.head_stack.enter_context(ray_head(env, num_cpus=4))
        self.stack.callback(self.head_stack.close)

    def copy_demo_store_to_prod(self) -> None:
        """What `ray job submit ... jobs.demo --store s3://ccs/prod` leaves: the demo's store."""
        prod = prod_store(self.s3_endpoint)
        local = self.checkout / "ccs-data"
        for top in ("incoming", "labels", "models", "results"):
            for f in sorted(p for p in (local / top).rglob("*") if p.is_file()):
                prod.put_file(f, f.relative_to(local).as_posix())

    def grant_token(self, err: str) -> None:
        """The platform side adds the entry `ccs token` printed to the service's tokens."""
        m = re.search(r"tokens:\)?:?\s+(\S+): ([0-9a-f]{64})", err)
        assert m, f"no service config entry in `ccs token`'s stderr: {err!r}"
        path = self.checkout / "serve" / "config.yaml"
        cfg = yaml.safe_load(path.read_text())
        cfg["applications"][0]["args"]["tokens"][m[1]] = m[2]
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    def start_service(self, line: str, health: str) -> None:
        pid, log = self.background(line)
        self.services.append(pid)
        self.stack.callback(stop_service, pid)
        url = f"http://127.0.0.1:{self.service_port}{health}"
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as reply:
                if reply.status == 200:
                    return
            if not os.path.exists(f"/proc/{pid}"):
                break
            time.sleep(2)
        pytest.fail(f"{line}: no answer on {url}\n{log.read_text()[-4000:]}")

    def substitute(self, text: str) -> str:
        values = {
            "http://127.0.0.1:8265": self.head or "(no head started)",
            "https://screening.example.org": f"http://127.0.0.1:{self.service_port}",
            DEMO_TAG: TOY_TAG,
        }
        for old in SUBSTITUTED:
            text = text.replace(old, values[old])
        return text


def stop_service(pid: int) -> None:
    """Stop a service line and the local Ray it started: they share its session. (SIGTERM: a
    background command of a non-interactive shell ignores Ctrl-C's SIGINT.)"""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(1)
    kill_session(pid)


def prod_store(s3_endpoint: str) -> Store:
    return Store(StoreConfig(uri=PROD, s3=S3Options(**moto_s3(s3_endpoint))))


def service_config(s3_endpoint: str, port: int, tmp: Path) -> dict:
    """serve/config.yaml as the platform runs it for s3://ccs/prod, at toy size."""
    from toy_models import toy_screening

    cfg = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    screening = toy_screening(tmp).model_dump(mode="json", exclude={"adapt"})
    app = cfg["applications"][0]
    app["args"] = deep_merge(
        app["args"],
        {"store": {"uri": PROD, "s3": moto_s3(s3_endpoint)}, "screening": screening,
         "poll_s": 0.5},
    )  # fmt: skip
    app["args"]["screening"]["adequacy"] = {"min_squamous": 1}
    cfg["http_options"] = {"host": "127.0.0.1", "port": port}
    return cfg


def make_checkout(root: Path, s3_endpoint: str, service_port: int) -> Path:
    """The parts of a clone the README's lines use (jobs/, serve/, .gitignore), its job configs
    and service config at toy size."""
    checkout = root / "checkout"
    (checkout / "jobs" / "configs").mkdir(parents=True)
    (checkout / "serve").mkdir()
    shutil.copy(REPO / ".gitignore", checkout / ".gitignore")
    for f in (REPO / "jobs").glob("*.py"):
        shutil.copy(f, checkout / "jobs" / f.name)
    for f in (REPO / "jobs" / "configs").glob("*.yaml"):
        raw = yaml.safe_load(f.read_text())
        toy = deep_merge(raw, TOY_JOBS[f.name]) if f.name in TOY_JOBS else raw
        (checkout / "jobs" / "configs" / f.name).write_text(yaml.safe_dump(toy, sort_keys=False))
    for f in (REPO / "serve").glob("*.py"):
        shutil.copy(f, checkout / "serve" / f.name)
    cfg = service_config(s3_endpoint, service_port, root)
    (checkout / "serve" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return checkout


def make_scans(cohort: Path, to: Path) -> None:
    """A center's own folder of slides, as a scanner leaves it (``s1.svs`` ..., no manifest):
    two synthetic slides."""
    to.mkdir(parents=True)
    slides = sorted(cohort.rglob("int-a/slides/*.svs"))[:2]
    for i, f in enumerate(slides, 1):
        shutil.copy(f, to / f"s{i}.svs")


@pytest.fixture
def tour(
    toy_demo: ToyDemo, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Tour]:
    import boto3

    root = tmp_path_factory.mktemp("readme")
    port = free_port()
    checkout = make_checkout(root, s3_endpoint, port)
    make_scans(toy_demo.cohort, checkout / "scans" / "2026-11-21")
    shutil.copytree(toy_demo.store_dir, checkout / "ccs-data")  # what the demo leaves

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket="ccs")
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="ccs"):
        for obj in page.get("Contents", []):
            s3.delete_object(Bucket="ccs", Key=obj["Key"])

    home = root / "home"
    home.mkdir()
    env = fresh_env(home) | {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    logs = root / "logs"
    logs.mkdir()
    t = Tour(root=root, checkout=checkout, env=env, s3_endpoint=s3_endpoint, service_port=port,
             logs=logs)  # fmt: skip
    with t.stack:
        t.start_shell()
        yield t


BEFORE: dict[str, Callable[[Tour], None]] = {"ray up ray-cluster.yaml": Tour.start_head}
AT_SKIP: dict[str, Callable[[Tour], None]] = {
    "ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m jobs.demo": (
        Tour.copy_demo_store_to_prod
    ),
}


def _sql(tour: Tour, example: Example) -> None:
    import duckdb

    cwd = Path.cwd()
    os.chdir(tour.checkout)  # the SQL names ccs-data/... relative to the checkout
    try:
        rows = duckdb.sql(example.text).fetchall()
    finally:
        os.chdir(cwd)
    assert rows, f"{example.section}: the SQL returned no rows:\n{example.text}"
    print(f"--- {example.section} SQL: {rows}")


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.timeout(5400)
def test_every_readme_example_runs_on_a_toy_demo_store(tour: Tour):
    skipped = []
    examples = readme_examples(README.read_text())
    last_on_head = max(i for i, e in enumerate(examples) if "127.0.0.1:8265" in e.text)
    for i, example in enumerate(examples):
        if i > last_on_head:
            tour.head_stack.close()  # its cluster is done with: its CPUs back to the rest
        if example.kind == "sql":
            _sql(tour, example)
            continue
        cmd = example.command
        for start, action in BEFORE.items():
            if cmd.startswith(start):
                action(tour)
        why = skip_reason(example)
        if why:
            skipped.append(f"{cmd}: {why}")
            for start, action in AT_SKIP.items():
                if cmd.startswith(start):
                    action(tour)
            continue
        line = tour.substitute(example.text)
        health = next((h for s, h in SERVICES.items() if cmd.startswith(s)), None)
        t0 = time.monotonic()
        if health:
            tour.start_service(line, health)
            print(f"--- {example.section}: {line} (up in {time.monotonic() - t0:.0f} s)")
            continue
        rc, out, err = tour.run(line)
        print(f"--- {example.section}: {line} -> {rc} ({time.monotonic() - t0:.0f} s)")
        assert rc == 0, f"{example.section}: `{line}` exited {rc}\n{out[-3000:]}\n{err[-5000:]}"
        if cmd.startswith("TOKEN=$(ccs token"):
            tour.grant_token(err)
    print("skipped, with their reasons:\n" + "\n".join(skipped))
