"""The platform engineer's commands against a Ray cluster started the way the docs say.

A Ray head of its own, ``ray start --head`` (docs/training.md, "Submitting"), run from a home
where ``ray get-auth-token --generate`` put the cluster's token: Ray 2.60 then turns token
authentication on. Its job server is addressed by this machine's host name, as a remote head
is, not by a loopback address. Then, from a fresh shell (no ``RAY_AUTH_MODE``):

- ``ccs submit`` finds the token itself and the job runs, with a config from outside the
  working directory;
- ``ray job submit`` as the README once wrote it is refused ("Authentication required"), and
  with ``RAY_AUTH_MODE=token`` exported, as the README now says, it runs.

The head runs in a session of its own with its own temp dir, home and ports, so it never meets
the suite's shared Ray or a demo on the same machine, and every process of that session is
killed at the end. About a minute on an idle 2-core machine.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cli import run_ccs
from ray_head import RAY, fresh_env, ray_head

from smartccs.submit import server_auth_mode

pytestmark = [pytest.mark.slow]

HELLO = '''"""A job that only reads its config and joins the cluster."""
import sys

from pydantic import BaseModel

from smartccs.jobrunner import run_job


class Hello(BaseModel):
    greeting: str


if __name__ == "__main__":
    sys.exit(run_job("jobs.hello", None, Hello, lambda c: c.greeting,
                     lambda g: f"hello job says: {g}"))
'''


@pytest.fixture
def head(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A Ray head started as docs/training.md says (tests/ray_head.py); yields its job server
    URL and the home that holds the cluster's token."""
    home = tmp_path / "home"
    home.mkdir()
    env = fresh_env(home)
    subprocess.run([str(RAY), "get-auth-token", "--generate"], env=env, check=True,
                   capture_output=True, timeout=120)  # fmt: skip
    assert (home / ".ray" / "auth_token").is_file()
    with ray_head(env) as address:
        yield address, home


def _working_dir(tmp_path: Path) -> Path:
    wd = tmp_path / "wd"
    (wd / "jobs").mkdir(parents=True)
    (wd / "jobs" / "__init__.py").write_text("")
    (wd / "jobs" / "hello.py").write_text(HELLO)
    (wd / "configs").mkdir()
    (wd / "configs" / "hello.yaml").write_text(yaml.safe_dump({"greeting": "from the repo"}))
    return wd


def test_readme_commands_and_ccs_submit_on_a_token_cluster(head, tmp_path):
    address, home = head
    assert server_auth_mode(address) == "token", "a token existed, so `ray start` turned it on"
    wd = _working_dir(tmp_path)
    env = fresh_env(home)
    mine = tmp_path / "elsewhere" / "hello.yaml"  # a config outside the working dir
    mine.parent.mkdir()
    mine.write_text(yaml.safe_dump({"greeting": "from my own config"}))

    res = run_ccs("submit", "hello", "--config", str(mine), "--working-dir", str(wd),
                  "--address", address, env=env, timeout=420)  # fmt: skip
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    assert "--config env:CCS_JOB_CONFIG" in res.stdout, res.stdout[-3000:]
    assert "hello job says: from my own config" in res.stdout, res.stdout[-3000:]
    assert re.search(r"^job ccs-hello-\S+ SUCCEEDED$", res.stdout, re.M), res.stdout[-2000:]

    submit = [str(RAY), "job", "submit", "--address", address, "--working-dir", str(wd),
              "--", "python", "-m", "jobs.hello", "--config", "configs/hello.yaml"]  # fmt: skip
    refused = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0
    assert "Authentication required" in refused.stdout + refused.stderr, refused.stderr[-2000:]

    ran = subprocess.run(submit, env=env | {"RAY_AUTH_MODE": "token"}, capture_output=True,
                         text=True, timeout=420)  # fmt: skip
    out = ran.stdout + ran.stderr
    assert ran.returncode == 0, out[-3000:]
    assert "hello job says: from the repo" in out and "succeeded" in out, out[-3000:]
