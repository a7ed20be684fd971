"""Where things live inside a store (docs/store.md; contracts: docs/architecture.md).

``incoming/<center>/<batch>/``, ``results/<table>/center=<c>/batch=<b>/`` (with its commit
marker in ``results/_commits/<table>/center=<c>/batch=<b>/``), ``models/<name>/<version>/``,
``runs/<run_id>/``. Every id is validated here, so no caller can build a key that escapes its
prefix.
"""

from smartccs.ids import validate_id

COMMIT_MARKER = "_COMMITTED"
"""Written last, create-if-absent: its presence is what makes a prefix visible to readers."""


def incoming(center: str, batch: str) -> str:
    return f"incoming/{validate_id(center, 'center')}/{validate_id(batch, 'batch')}"


def results(table: str, center: str, batch: str) -> str:
    return (
        f"results/{validate_id(table, 'table')}/center={validate_id(center, 'center')}"
        f"/batch={validate_id(batch, 'batch')}"
    )


RESULT_COMMITS = "results/_commits"
"""Where the result tables' commit markers live: a tree beside the tables that mirrors their
partitions, so a table folder holds nothing but Parquet files (polars refuses a folder holding
any other file). ``_commits`` is no valid id, so it can never be a table's name."""


def result_commit(table: str, center: str, batch: str) -> str:
    """The prefix holding the commit marker of the partition ``results(table, center, batch)``."""
    return f"{RESULT_COMMITS}/{results(table, center, batch).removeprefix('results/')}"


def model(name: str, version: str) -> str:
    return f"models/{validate_id(name, 'model name')}/{validate_id(version, 'model version')}"


def run(run_id: str) -> str:
    return f"runs/{validate_id(run_id, 'run id')}"


def labels(center: str, batch: str) -> str:
    """Annotations of a committed batch (cell boxes), kept apart from the scans they describe."""
    return f"labels/{validate_id(center, 'center')}/{validate_id(batch, 'batch')}"


def locate(uri: str, kind: str) -> tuple[str | None, list[str]]:
    """Split ``<root>/<kind>/a/b`` into (root, [a, b]); ``kind/a/b`` and ``a/b`` give no root.

    Lets a user name a batch or model by its full URI (``s3://bkt/ccs/incoming/c/b``) or by its
    id (``c/b``) alike.
    """
    text = uri.rstrip("/")
    marker = f"/{kind}/"
    if text.startswith(f"{kind}/"):
        return None, text[len(kind) + 1 :].split("/")
    if marker in text:
        root, _, rest = text.rpartition(marker)
        return root or "/", rest.split("/")
    return None, text.split("/")
