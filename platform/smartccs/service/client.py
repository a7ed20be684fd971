"""A center's side of the service: register an uploaded batch, follow it (``ccs upload
--submit``). Plain HTTP and JSON: any client in any language can do the same."""

from __future__ import annotations

import os
import time
from typing import Any

import requests

from smartccs.errors import CCSError
from smartccs.service.records import FINAL_STATES
from smartccs.service.routes import BATCHES

TOKEN_ENV = "CCS_TOKEN"


def resolve_token(token: str | None) -> str:
    """The center token given, else $CCS_TOKEN; a clear error without one."""
    token = token or os.environ.get(TOKEN_ENV)
    if not token:
        raise CCSError(f"no center token: pass --token or set ${TOKEN_ENV}")
    return token


def _call(method: str, url: str, token: str, **kwargs: Any) -> dict[str, Any]:
    try:
        r = requests.request(
            method, url, headers={"Authorization": f"Bearer {token}"}, timeout=60, **kwargs
        )
    except requests.RequestException as exc:
        raise CCSError(f"{method} {url}: {exc}") from None
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        raise CCSError(f"{method} {url}: {r.status_code} {detail}")
    return r.json()


def submit(url: str, center: str, batch: str, token: str | None = None, adapt: str | None = None):
    """Register a committed batch with the service; the 202 (or 200, already known) body,
    its URLs made absolute on ``url``."""
    body: dict[str, Any] = {"center": center, "batch": batch}
    if adapt:
        body["adapt"] = adapt
    answer = _call("POST", f"{url.rstrip('/')}{BATCHES}", resolve_token(token), json=body)
    for name in ("status_url", "results_url"):
        answer[name] = absolute(url, answer[name])
    return answer


def absolute(service_url: str, given: str) -> str:
    """A URL the service handed out, on the service URL the client called: a service without
    a configured ``public_url`` hands out paths from its root (``/v1/batches/<id>``)."""
    return f"{service_url.rstrip('/')}{given}" if given.startswith("/") else given


def wait(status_url: str, token: str | None = None, timeout_s: float = 3600, poll_s: float = 2):
    """Poll a batch's status until it is done or failed; the last status."""
    token = resolve_token(token)
    deadline = time.monotonic() + timeout_s
    while True:
        status = _call("GET", status_url, token)
        if status["state"] in FINAL_STATES or time.monotonic() > deadline:
            return status
        time.sleep(poll_s)
