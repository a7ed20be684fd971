"""DINO pretraining as a Ray job: ``python -m jobs.pretrain --config <yaml>``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from smartccs.errors import CCSError, describe_validation_error
from smartccs.logs import configure_logging
from smartccs.raycluster import init_ray
from smartccs.train.pretrain import PretrainConfig, pretrain


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobs.pretrain", description=__doc__)
    parser.add_argument("--config", required=True, type=Path, help="a PretrainConfig YAML")
    parser.add_argument("--store", help="override the config's store URI")
    args = parser.parse_args(argv)
    configure_logging(1)
    try:
        raw = yaml.safe_load(args.config.read_text()) or {}
        if args.store:
            raw["store"] = {"uri": args.store}
        cfg = PretrainConfig.model_validate(raw)
        init_ray()
        result = pretrain(cfg)
    except ValidationError as exc:
        print(f"jobs.pretrain: {args.config}: {describe_validation_error(exc)}", file=sys.stderr)
        return 1
    except (CCSError, OSError, yaml.YAMLError) as exc:
        print(f"jobs.pretrain: {exc}".replace("\n", "; "), file=sys.stderr)
        return 1
    print(f"saved encoder {result.version} after step {result.step} (loss {result.loss:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
