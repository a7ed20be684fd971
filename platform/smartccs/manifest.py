"""The batch manifest: what a center uploads beside its slides (docs/store.md)."""

import codecs
import json
from pathlib import PurePosixPath
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from smartccs.errors import ManifestError, describe_validation_error
from smartccs.ids import Id
from smartccs.taxonomy import Grade

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="lower-case hex sha256")]


class SlideEntry(BaseModel):
    """One slide of a batch.

    Strict: ``"bytes": "123"``, ``"mpp": true`` or ``"mpp": "0.5"`` are refused, not coerced; a
    client that writes numbers as strings has a bug that its checksums may share.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    slide_id: Id
    path: str = Field(description="path of the slide file relative to the batch folder")
    sha256: Sha256
    bytes: int = Field(gt=0, description="file size in bytes")
    mpp: float | None = Field(
        default=None, gt=0.01, lt=100.0, description="microns per pixel override (level 0)"
    )
    grade: Grade | None = Field(default=None, description="ground-truth slide grade, if known")

    @field_validator("path")
    @classmethod
    def _relative_path(cls, value: str) -> str:
        p = PurePosixPath(value)
        if (
            not value
            or "\\" in value
            or p.is_absolute()
            or any(part in ("", ".", "..") for part in value.split("/"))
            or any(part.startswith((".", "_")) for part in p.parts)
            or not value.isprintable()  # NUL, newlines, bidi overrides: not in a key or a log
        ):
            raise ValueError(
                f"path {value!r} must be relative, use '/', and have no '.', '..', hidden "
                "parts or unprintable characters"
            )
        return value


class Manifest(BaseModel):
    """A batch of slides from one center; the unit of upload, screening and results."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    center: Id
    batch: Id
    slides: list[SlideEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> "Manifest":
        for attr in ("slide_id", "path"):
            seen: set[str] = set()
            for s in self.slides:
                value = getattr(s, attr)
                if value in seen:
                    raise ValueError(f"duplicate {attr} {value!r}")
                seen.add(value)
        return self

    def slide(self, slide_id: str) -> SlideEntry:
        for s in self.slides:
            if s.slide_id == slide_id:
                return s
        raise KeyError(slide_id)

    def dumps(self) -> bytes:
        """Canonical bytes: stable key order, so equal manifests hash equal."""
        return (json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def loads(cls, data: bytes | str, source: str = MANIFEST_NAME) -> "Manifest":
        """Parse and validate, naming ``source`` and the offending field on failure.

        A UTF-8 byte order mark, which Windows editors write, is accepted and dropped.
        """
        if isinstance(data, bytes):
            data = data.removeprefix(codecs.BOM_UTF8)
        else:
            data = data.removeprefix("\ufeff")
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise ManifestError(f"{source}: {describe_validation_error(exc)}") from None
