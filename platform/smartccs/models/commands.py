"""``ccs models import``: published weights into the store (registered by smartccs.cli).

Kept apart from cli.py so the main CLI only registers it; the work is in
smartccs.models.importer, imported only when the command runs (docs/models.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from smartccs.cli_flags import add_store_flag
from smartccs.models.compose import DEFAULT_THRESHOLD
from smartccs.models.zoo import ZOO


def cmd_import(args: argparse.Namespace) -> int:
    from smartccs.models.deformable_detr import DetrShape
    from smartccs.models.importer import import_models
    from smartccs.models.zoo import read_json_file, zoo_entry
    from smartccs.store import open_store

    shape = read_json_file(Path(args.detector_shape), DetrShape) if args.detector_shape else None
    done = import_models(
        open_store(uri=args.store),
        encoder=Path(args.encoder) if args.encoder else None,
        kind=zoo_entry(args.encoder_kind),
        mil=Path(args.mil) if args.mil else None,
        prototypes=Path(args.prototypes) if args.prototypes else None,
        detector=Path(args.detector) if args.detector else None,
        detector_shape=shape,
        name=args.name,
        threshold=args.threshold,
    )
    if args.json:
        print(json.dumps({"imported": [d.model_dump() for d in done]}, indent=2))
    else:
        for d in done:
            print(f"{d.role}: {d.ref}  (from {d.source}, sha256 {d.sha256[:12]})")
    return 0


def cmd_compose(args: argparse.Namespace) -> int:
    from smartccs.models.compose import compose_classifier
    from smartccs.store import open_store

    ref = compose_classifier(
        open_store(uri=args.store),
        name=args.name,
        encoder=args.encoder,
        slide_head=args.slide_head,
        detector=args.detector,
        prototypes=args.prototypes,
        threshold=args.threshold,
    )
    print(json.dumps({"classifier": ref.label}) if args.json else f"classifier: {ref.label}")
    return 0


def _threshold_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help="slide score 1 - P(NILM) from which the composed classifier calls a slide "
        f"positive (default {DEFAULT_THRESHOLD}; the release has no operating point: choose "
        "one on labelled slides of your population)",
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``models`` and its actions to the ``ccs`` sub-command set."""
    p = sub.add_parser(
        "models", help="published models: import them into the store, compose a classifier"
    )
    actions = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    q = actions.add_parser(
        "import",
        help="import a published encoder, Smart-CCS MeanMIL head, TTA prototype bank and/or "
        "Det-cell detector",
    )
    add_store_flag(q)
    q.add_argument("--encoder", metavar="FILE", help="encoder weights (.pth / .bin)")
    q.add_argument(
        "--encoder-kind",
        default="smart-ccs-vitl14",
        metavar="KIND",
        help=f"what the encoder file is: {', '.join(ZOO)}, or a .json file of a kind "
        "(default: smart-ccs-vitl14, the reference's CCS_vitL_100M.pth); also the encoder "
        "the head and the bank are checked against",
    )
    q.add_argument("--mil", metavar="FILE", help="the reference's MeanMIL.pth slide head")
    q.add_argument("--prototypes", metavar="FILE", help="the reference's proto_bank.pth")
    q.add_argument(
        "--detector",
        metavar="FILE",
        help="the reference's Det-cell Deformable-DETR checkpoint (bare or {'model': ...})",
    )
    q.add_argument(
        "--detector-shape",
        metavar="FILE",
        default=None,
        help="a .json DetrShape for --detector (default: the reference's ResNet-50, 256-d, "
        "6+6 layers, 300 queries, 4 levels)",
    )
    q.add_argument(
        "--name",
        default=None,
        help="model name: the encoder is NAME, the head NAME-meanmil, the bank "
        "NAME-prototypes, the detector NAME-detector (default: the encoder kind, or smart-ccs "
        "without --encoder)",
    )
    _threshold_flag(q)
    q.add_argument("--json", action="store_true", help="print what was imported as JSON")
    q.set_defaults(func=cmd_import)

    c = actions.add_parser(
        "compose",
        help="a slide classifier of the store's imported encoder, MeanMIL head, detector and "
        "prototype bank, for ccs screen (import composes one when given all three files)",
    )
    add_store_flag(c)
    c.add_argument("--name", required=True, help="the classifier's model name")
    c.add_argument("--encoder", required=True, metavar="REF", help="imported encoder (name[/v])")
    c.add_argument("--slide-head", required=True, metavar="REF", help="imported MeanMIL head")
    c.add_argument(
        "--detector",
        required=True,
        metavar="REF",
        help="cell detector: the imported Deformable DETR or one trained here",
    )
    c.add_argument("--prototypes", metavar="REF", help="imported prototype bank (smartccs TTA)")
    _threshold_flag(c)
    c.add_argument("--json", action="store_true", help="print the classifier's ref as JSON")
    c.set_defaults(func=cmd_compose)
