"""``ccs deploy ...``: the deployment helpers on the command line (registered by smartccs.cli).

Kept apart from cli.py so the main CLI only registers it; the work itself is in the modules
next to this one, imported only when a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_SCREENING_BENCH = "bench/figures/screening-cpu2-12k.json"
DEFAULT_STREAM_BENCH = "bench/figures/tile_stream-r1.json"


def cmd_policy(args: argparse.Namespace) -> int:
    from smartccs.deploy.policy import StoreLocation, center_policies, read_centers

    bundle = center_policies(StoreLocation.from_uri(args.store), read_centers(args.centers))
    text = json.dumps(bundle, indent=2) + "\n"
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {len(bundle['centers'])} center policies and the platform's to {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_rayservice(args: argparse.Namespace) -> int:
    from smartccs.deploy.rayservice import cluster_serve_text, sync_rayservice

    if args.print:
        sys.stdout.write(cluster_serve_text(Path(args.repo)))
        return 0
    changed = sync_rayservice(Path(args.repo), check=args.check)
    print(f"infra/rayservice.yaml: {'updated' if changed else 'up to date'}")
    return 0


def cmd_sizing(args: argparse.Namespace) -> int:
    from smartccs.deploy.sizing import (
        NODE_TYPES,
        Workload,
        format_report,
        load_measured,
        production_tiling,
        size_cluster,
    )

    measured = load_measured(args.screening_bench, args.stream_bench)
    tiling, scorer_cpus = production_tiling(args.config)
    workload = Workload(
        slides=args.slides,
        days=args.days,
        centers=args.centers,
        specimen_mm2=args.specimen_mm2,
        foreground=args.foreground,
        slide_gb=args.slide_gb,
    )
    sizing = size_cluster(
        measured,
        workload,
        NODE_TYPES[args.node],
        args.gpu_tiles_per_s,
        production=tiling,
        scorer_cpus=scorer_cpus,
        busy=args.busy,
    )
    print(format_report(measured, workload, sizing))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``deploy`` and its actions to the ``ccs`` sub-command set."""
    p = sub.add_parser(
        "deploy", help="deployment helpers: center S3 policies, the RayService config, sizing"
    )
    actions = p.add_subparsers(dest="deploy_command", required=True, metavar="ACTION")

    q = actions.add_parser("policy", help="per-center S3 IAM policies from a list of centers")
    q.add_argument("--store", required=True, help="the store root, s3://bucket/prefix")
    q.add_argument("--centers", required=True, help="text file: one center id per line")
    q.add_argument("--out", default=None, help="write the JSON here (default: stdout)")
    q.set_defaults(func=cmd_policy)

    q = actions.add_parser(
        "rayservice",
        help="write serve/config.yaml (+ infra/serve-overrides.yaml) into infra/rayservice.yaml",
    )
    q.add_argument("--repo", default=".", help="the repository root (default: .)")
    q.add_argument("--check", action="store_true", help="change nothing; exit 1 if out of date")
    q.add_argument(
        "--print",
        action="store_true",
        help="print the cluster's Serve config instead (for `serve deploy` on a `ray up` cluster)",
    )
    q.set_defaults(func=cmd_rayservice)

    from smartccs.deploy.sizing import NODE_TYPES  # a table of constants, cheap to import

    q = actions.add_parser(
        "sizing", help="GPUs, CPUs and nodes for a workload, from the figures measured in bench/"
    )
    q.add_argument(
        "--screening-bench",
        default=DEFAULT_SCREENING_BENCH,
        help=f"JSON of bench/screening.py (default: {DEFAULT_SCREENING_BENCH})",
    )
    q.add_argument(
        "--stream-bench",
        default=DEFAULT_STREAM_BENCH,
        help=f"JSON of bench/tile_stream.py, for reader actors (default: {DEFAULT_STREAM_BENCH})",
    )
    q.add_argument(
        "--config",
        default="jobs/configs/screen-prod.yaml",
        help="the production screening config: its tile size and mpp",
    )
    q.add_argument("--slides", type=int, default=127_471, help="slides in the workload")
    q.add_argument("--days", type=float, default=30.0, help="days to screen them in")
    q.add_argument("--centers", type=int, default=48, help="centers sharing the cluster")
    q.add_argument(
        "--specimen-mm2",
        type=float,
        default=314.16,
        help="specimen area per slide, mm² (default: a 20 mm ThinPrep circle)",
    )
    q.add_argument(
        "--foreground", type=float, default=1.0, help="share of specimen tiles kept (default: 1)"
    )
    q.add_argument("--slide-gb", type=float, default=1.0, help="average slide file size, GB")
    q.add_argument(
        "--gpu-tiles-per-s",
        type=float,
        default=None,
        help="measured scorer tiles/s on one GPU (production models); overrides the bench's",
    )
    q.add_argument("--node", choices=sorted(NODE_TYPES), default="g5.12xlarge")
    q.add_argument(
        "--busy", type=float, default=0.7, help="planned busy share of the scorers (headroom)"
    )
    q.set_defaults(func=cmd_sizing)
