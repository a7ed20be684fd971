"""User-facing errors.

Everything a user can act on (a bad file, a bad id, a missing mpp) is a ``CCSError``: the CLI
prints its message as one line and exits non-zero, the tile stream turns it into an error row.
Anything else is a bug and keeps its traceback.
"""

from pydantic import ValidationError


class CCSError(Exception):
    """An error whose message alone tells the user what is wrong and where."""


class InvalidIdError(CCSError, ValueError):
    """A center, batch or slide id that is not a safe path segment."""


class ManifestError(CCSError):
    """A manifest that cannot be read or does not validate."""


class SlideError(CCSError):
    """A slide that cannot be opened or read."""


class MissingMppError(SlideError):
    """A slide whose pixel size is unknown: we never guess it."""


class TooCoarseError(SlideError):
    """A slide scanned coarser than the model's tiles need: upsampling would invent detail."""


class NoForegroundError(SlideError):
    """A slide with no cells on it at the foreground threshold."""


class StoreError(CCSError):
    """A store URI, object or commit that is not as expected."""


class AlreadyCommittedError(StoreError):
    """A committed batch, table partition or model version is never overwritten."""


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem, each naming the field path (``slides.2.sha256: ...``)."""
    parts = []
    for err in exc.errors():
        loc = ".".join(printable(str(x)) for x in err["loc"]) or "(root)"
        msg = printable(err["msg"].removeprefix("Value error, "))
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def printable(text: str) -> str:
    """``text``, or its repr when it holds a newline or other control: field names come from
    the document being refused, and must not break the message onto a second line."""
    return text if text.isprintable() else repr(text)
