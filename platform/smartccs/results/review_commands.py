"""``ccs reviews export-labels``: reviewed cells into a batch's cell labels (registered by
smartccs.cli).

Kept apart from cli.py so the main CLI only registers it; the work is in
smartccs.results.reviews, imported only when the command runs (docs/results.md).
"""

from __future__ import annotations

import argparse

from smartccs.cli_flags import add_store_flag


def _batch(text: str) -> tuple[str, str]:
    center, sep, batch = text.partition("/")
    if not sep or not center or not batch or "/" in batch:
        raise argparse.ArgumentTypeError(f"{text!r} is not CENTER/BATCH")
    return center, batch


def cmd_export_labels(args: argparse.Namespace) -> int:
    from smartccs.results.reviews import export_reviewed_labels
    from smartccs.store import open_store

    center, batch = args.batch
    done = export_reviewed_labels(open_store(uri=args.store), center, batch, out=args.out)
    print(
        f"wrote {done.rows} cell labels to {done.target}: {done.reviewed} from reviews, "
        f"{done.superseded} earlier annotation(s) superseded"
    )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``reviews`` and its actions to the ``ccs`` sub-command set."""
    p = sub.add_parser("reviews", help="cytologists' sign-offs (the reviews table)")
    actions = p.add_subparsers(dest="reviews_command", required=True, metavar="ACTION")

    q = actions.add_parser(
        "export-labels",
        help="the cells corrected in a batch's current reviews as cell labels for detector "
        "finetuning: merged into the batch's labels (a reviewed cell replaces an annotation it "
        "overlaps at IoU >= 0.5; not_a_cell ones only remove), or written to --out",
    )
    q.add_argument("--batch", required=True, type=_batch, metavar="CENTER/BATCH")
    add_store_flag(q)
    q.add_argument(
        "--out",
        metavar="FILE.parquet",
        default=None,
        help="write the merged labels to this file instead of publishing them to the store",
    )
    q.set_defaults(func=cmd_export_labels)
