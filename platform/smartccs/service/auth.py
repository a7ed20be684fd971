"""Per-center bearer tokens, kept only as sha256 digests.

A token is a random secret a center sends as ``Authorization: Bearer <token>``; the service
holds its digest (from its config or a mounted secret), so neither a leaked config nor the
store gives a token away. A token names exactly one center; a reviewer's token also names the
cytologist whose sign-offs it records.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

from smartccs.errors import CCSError
from smartccs.ids import validate_id

TOKENS_ENV = "CCS_SERVICE_TOKENS"
"""JSON mapping center -> token sha256, or a path to a file holding it (a mounted Secret)."""


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> tuple[str, str]:
    """A fresh token and its digest (the digest goes into the service config)."""
    token = secrets.token_urlsafe(32)
    return token, token_digest(token)


def _check_digest(digest: str, whose: str) -> None:
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise CCSError(f"service tokens: {whose} needs a sha256 hex digest")


class TokenBook:
    """center -> token digest, and reviewer token digests -> (center, name); answers which
    center (and which reviewer) a presented token belongs to."""

    def __init__(
        self, digests: dict[str, str], reviewers: dict[str, tuple[str, str]] | None = None
    ):
        for center, digest in digests.items():
            validate_id(center, "center")
            _check_digest(digest, repr(center))
        for digest, (center, _) in (reviewers or {}).items():
            validate_id(center, "center")
            _check_digest(digest, f"a reviewer of {center!r}")
        self._digests = dict(digests)
        self._reviewers = dict(reviewers or {})

    @classmethod
    def load(
        cls,
        inline: dict[str, str],
        source: str | None = None,
        reviewers: dict[str, tuple[str, str]] | None = None,
    ) -> TokenBook:
        """Digests from the config, plus ``source`` or $CCS_SERVICE_TOKENS (JSON or a file)."""
        digests = dict(inline)
        raw = source or os.environ.get(TOKENS_ENV)
        if raw:
            text = raw if raw.lstrip().startswith("{") else Path(raw).read_text()
            try:
                digests |= json.loads(text)
            except json.JSONDecodeError as exc:
                raise CCSError(f"service tokens: not JSON ({exc})") from None
        return cls(digests, reviewers)

    def __len__(self) -> int:
        return len(self._digests)

    def center_of(self, token: str) -> str | None:
        """The center whose token (or whose reviewer's token) this is, comparing digests in
        constant time; else None."""
        digest = token_digest(token)
        found = None
        for center, known in self._digests.items():
            if hmac.compare_digest(digest, known):
                found = center
        reviewer = self._reviewer(digest)
        return reviewer[0] if reviewer else found

    def reviewer_of(self, token: str) -> tuple[str, str] | None:
        """(center, name) when this is a reviewer's token; else None."""
        return self._reviewer(token_digest(token))

    def _reviewer(self, digest: str) -> tuple[str, str] | None:
        found = None
        for known, who in self._reviewers.items():
            if hmac.compare_digest(digest, known):
                found = who
        return found
