"""What every ``python -m jobs.<name>`` entrypoint does around its library call.

Read the YAML config into the job's pydantic model (``--store`` overrides its store, flags such
as ``--batch`` replace top-level fields), run the job's ``check`` (what can be known from the
store without Ray: which batches, whether the splits fill), start or join Ray, run, print one
summary line; a bad config or a platform error is one line on stderr naming the file or field
and exit status 1, never a traceback. The job logs its own progress; ``-v`` adds Ray's
(``smartccs.logs``).

``--config`` is a path, or ``env:NAME`` for YAML text in the environment variable ``NAME``:
how ``ccs submit`` ships a config from outside the working directory it uploads
(``smartccs.submit``, ``CONFIG_ENV``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from smartccs.errors import CCSError, describe_validation_error
from smartccs.logs import configure_logging

C = TypeVar("C", bound=BaseModel)

ENV_PREFIX = "env:"


@dataclass(frozen=True)
class JobFlag:
    """A command-line flag that sets one config field (``repeat``: a list field; a dotted
    ``field`` sets a nested one). A job's flags are one table, which both its
    ``python -m jobs.<name>`` door and any ``ccs`` command for the same job add."""

    flag: str
    field: str
    help: str
    repeat: bool = False
    type: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None


def add_flags(parser: argparse.ArgumentParser, flags: Sequence[JobFlag]) -> None:
    for f in flags:
        action = "append" if f.repeat else "store"
        metavar = None if f.choices else f.flag.lstrip("-").upper().replace("-", "_")
        parser.add_argument(
            f.flag, dest=f.field, action=action, type=f.type, choices=f.choices,
            metavar=metavar, help=f.help,
        )  # fmt: skip


def flag_overrides(args: argparse.Namespace, flags: Sequence[JobFlag]) -> dict[str, Any]:
    """The config fields the given flags set, nested where a field is dotted."""
    out: dict[str, Any] = {}
    for f in flags:
        value = getattr(args, f.field)
        if value is None:
            continue
        *parents, leaf = f.field.split(".")
        node = out
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` laid onto ``base``: nested mappings merge key by key, anything else replaces."""
    out = dict(base)
    for k, v in update.items():
        out[k] = (
            deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def read_config_text(source: Path | str) -> str:
    """The YAML of ``--config``: a file, or ``env:NAME``, the text in variable ``NAME``."""
    text = str(source)
    if text.startswith(ENV_PREFIX):
        name = text.removeprefix(ENV_PREFIX)
        if name not in os.environ:
            raise CCSError(f"--config {text}: environment variable {name} is not set")
        return os.environ[name]
    return Path(source).expanduser().read_text()


def load_config(
    model: type[C],
    path: Path | str | None,
    store: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> C:
    """A job config from YAML (or the model's defaults without a file); ``store`` (a URI)
    replaces the file's store and ``overrides`` replace the fields they name (nested dicts
    replace nested fields only)."""
    raw = (yaml.safe_load(read_config_text(path)) or {}) if path is not None else {}
    if not isinstance(raw, dict):
        raise CCSError(f"{path}: expected a mapping of config fields")
    if store:
        raw["store"] = {"uri": store}
    return model.model_validate(deep_merge(raw, overrides or {}))


def run_job(
    prog: str,
    description: str | None,
    model: type[C],
    run: Callable[[C], Any],
    summary: Callable[[Any], str],
    argv: Sequence[str] | None = None,
    flags: Sequence[JobFlag] = (),
    *,
    check: Callable[[C], C] | None = None,
    config_required: bool | None = None,
) -> int:
    """``check`` takes the loaded config and returns the one to run, before Ray starts;
    ``--config`` is required unless the job has ``flags`` (or ``config_required`` says)."""
    required = not flags if config_required is None else config_required
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--config",
        required=required,
        help=f"a {model.__name__} YAML file, or env:VAR for YAML in an environment variable"
        + ("" if required else " (default: built-in defaults)"),
    )
    parser.add_argument("--store", help="override the config's store URI")
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS or a local Ray)")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="Ray's own progress output too (-vv)"
    )
    add_flags(parser, flags)
    args = parser.parse_args(argv)
    overrides = flag_overrides(args, flags)
    configure_logging(args.verbose)
    try:
        cfg = load_config(model, args.config, args.store, overrides)
        if check is not None:
            cfg = check(cfg)
        from smartccs.raycluster import init_ray

        init_ray(args.address)
        result = run(cfg)
    except ValidationError as exc:
        print(f"{prog}: {args.config}: {describe_validation_error(exc)}", file=sys.stderr)
        return 1
    except (CCSError, OSError, yaml.YAMLError) as exc:
        print(f"{prog}: {exc}".replace("\n", "; "), file=sys.stderr)
        return 1
    print(summary(result))
    return 0
