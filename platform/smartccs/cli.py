"""``ccs``: the command line door onto the library. Every command is a thin call into it.

Errors a user can act on print as ``ccs: error: ...`` on stderr (one line per problem) and exit
1; usage errors exit 2; anything unexpected prints one line too, with the traceback behind
``CCS_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError

from smartccs import __version__
from smartccs.adaptation.config import ADAPTIVE_METHODS, METHODS
from smartccs.cli_flags import add_store_flag
from smartccs.engine.flags import SCREEN_FLAGS
from smartccs.errors import CCSError, describe_validation_error
from smartccs.jobrunner import add_flags, flag_overrides
from smartccs.logs import configure_logging
from smartccs.store import Store, StoreConfig

log = logging.getLogger("smartccs.cli")

SIZES = ("tiny", "small", "medium", "large")


def cmd_synth(args: argparse.Namespace) -> int:
    from smartccs.synth.cohort import generate_cohort

    summary = generate_cohort(
        args.out,
        centers=None if args.center else args.centers,
        center_names=args.center or None,
        slides_per_center=args.slides_per_center,
        size=args.size,
        seed=args.seed,
        profiles=args.profiles,
        workers=args.workers,
        abnormal_density_scale=args.abnormal_density_scale,
    )
    print(summary.model_dump_json(indent=2) if args.json else summary.describe())
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from smartccs.slide.inspect import format_report, inspect_slide

    store = Store(StoreConfig.from_env(args.store)) if args.slide.startswith("s3://") else None
    report = inspect_slide(args.slide, store=store, mpp_override=args.mpp)
    print(report.model_dump_json(indent=2) if args.json else format_report(report))
    return 0


def _register_command(args: argparse.Namespace, store: Store) -> str:
    """The ``ccs upload --submit`` that registers this upload's batch once it is committed."""
    import shlex

    words = ["ccs", "upload", args.dir, "--center", args.center, "--batch", args.batch]
    words += ["--store", store.config.uri, "--submit", args.submit]
    words += ["--adapt", args.adapt] if args.adapt else []
    words += ["--wait"] if args.wait else []
    return shlex.join(words)


def cmd_upload(args: argparse.Namespace) -> int:
    from smartccs.upload import committed_as_in_folder, upload_batch

    store = Store(StoreConfig.from_env(args.store))
    where = dict(center=args.center, batch=args.batch, store=store, check_manifest=True)
    ref = None
    if args.submit:  # a missing token fails before anything is uploaded
        from smartccs.service import client

        token = client.resolve_token(args.token)
        # a re-run after a failed registration: the batch is committed with these very slides
        ref = committed_as_in_folder(args.dir, **where)
    if ref is None:
        ref = upload_batch(args.dir, break_lease=args.break_lease, **where)
        print(f"committed {len(ref.manifest.slides)} slides to {store.uri(ref.prefix)}")
    else:
        print(
            f"{store.uri(ref.prefix)} is already committed with the "
            f"{len(ref.manifest.slides)} slide(s) of {args.dir}; registering it"
        )
    if not args.submit:
        return 0
    try:
        sub = client.submit(args.submit, args.center, args.batch, token, args.adapt)
    except CCSError as exc:
        raise CCSError(
            f"batch {args.center}/{args.batch} WAS committed to {store.uri(ref.prefix)}, but "
            f"registering it with the service failed: {exc}\n"
            "register it once that is fixed (the token: --token or $CCS_TOKEN) with this "
            "command, which checks the folder against the committed batch and uploads nothing:\n"
            f"  {_register_command(args, store)}"
        ) from None
    print(f"submitted as {sub['batch_id']}: {sub['state']} ({sub['status_url']})")
    if not args.wait:
        return 0
    status = client.wait(sub["status_url"], token)
    print(
        f"{sub['batch_id']}: {status['state']}, {status['slides_done']}/{status['slides_total']} "
        f"slides, adaptation {status['adaptation']}; results: {sub['results_url']}"
    )
    return 0 if status["state"] == "done" else 1


def cmd_token(args: argparse.Namespace) -> int:
    import json

    from smartccs.ids import validate_id
    from smartccs.service.auth import new_token

    center = validate_id(args.center, "center")
    token, digest = new_token()
    who = {"center": center} | ({"name": args.reviewer} if args.reviewer else {})
    if args.json:
        print(json.dumps(who | {"token": token, "digest": digest}))
        return 0
    print(token)  # alone on stdout, so TOKEN=$(ccs token CENTER) holds just the token
    whose = f"{args.reviewer}'s ({center})" if args.reviewer else f"{center}'s"
    print(f"{whose} token is on stdout: give it to them (it is stored nowhere)", file=sys.stderr)
    if args.reviewer:
        print(f"service config entry (reviewers:):  {digest}: {json.dumps(who)}", file=sys.stderr)
    else:
        print(f"service config entry (tokens:):  {center}: {digest}", file=sys.stderr)
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    from smartccs.adaptation.state import history, rollback

    store = Store(StoreConfig.from_env(args.store))
    if args.action == "rollback":
        if not args.to:
            return _fail("ccs adapt rollback: --to VERSION is required")
        version = rollback(store, args.center, args.to)
        print(f"{args.center}: now at {version} (a copy of {args.to})")
        return 0
    cards = history(store, args.center)
    if not cards:
        print(f"{args.center}: no adapted state in {store.uri()} (screens with the source model)")
    for c in cards:
        h = c.head
        src = f"{h['source']['name']}/{h['source']['version']}"
        extra = f" rolled back to {h['rolled_back_to']}" if h.get("rolled_back_to") else ""
        stain = h.get("stain")
        if stain:
            extra += f"  stain hue {stain['hue_deg']:.1f} density {stain['density']:.3f}"
        print(
            f"{c.version}  {h['method']:<8} from {src}  batches {len(h['batches'])}  "
            f"drift {h['drift']:.4f}  resets {h['resets']}{extra}"
        )
    return 0


def cmd_labels(args: argparse.Namespace) -> int:
    from smartccs.batches import load_batch
    from smartccs.labels import put_cell_labels

    store = Store(StoreConfig.from_env(args.store))
    ref = load_batch(store, args.center, args.batch)
    print(f"published {put_cell_labels(store, ref, args.cells)}")
    return 0


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def cmd_submit(args: argparse.Namespace) -> int:
    from smartccs.submit import submit_job

    job = submit_job(
        args.name,
        args.config,
        args.address,
        store=args.store,
        working_dir=args.working_dir,
        wait=not args.no_wait,
        follow_logs=not args.no_wait,
        extra_env=dict(args.env),
        verbose=args.verbose,
    )
    if args.no_wait:
        print(f"submitted {job.job_id} ({job.status}) to {job.address}")
        print(f"  logs:   ray job logs {job.job_id} --address {job.address} --follow")
        print(f"  status: ray job status {job.job_id} --address {job.address}")
    else:
        print(f"job {job.job_id} {job.status}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import yaml

    from smartccs.study.ablation import SYNTHETIC_NOTE
    from smartccs.study.config import StudyConfig
    from smartccs.study.run import run_study

    raw = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    flags = {
        "cohort_dir": args.cohort_dir,
        "centers": args.centers,
        "slides_per_center": args.slides_per_center,
        "size": args.size,
        "abnormal_density_scale": args.abnormal_density_scale,
        "seed": args.seed,
        "address": args.address,
        "adapt": args.adapt,
    }
    raw |= {k: v for k, v in flags.items() if v is not None}
    if args.store or "store" not in raw:
        raw["store"] = StoreConfig.from_env(args.store).model_dump(mode="json")
    result = run_study(StudyConfig.model_validate(raw))
    print(f"\n{SYNTHETIC_NOTE}\n\n{result.table}\n\nreport: {result.report}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from smartccs.evaluation.run import run_evaluation, summary_line

    store = Store(StoreConfig.from_env(args.results))
    evaluation = run_evaluation(
        store,
        Path(args.out),
        labels=args.labels,
        centers=args.center,
        batches=args.batch,
        max_slides=args.max_slides,
        model=args.model,
    )
    print(summary_line(evaluation, Path(args.out) / "report.html"))
    return 0


def cmd_screen(args: argparse.Namespace) -> int:
    from smartccs.engine.job import ScreenJobConfig, check_screen_job, run_screen_job, summary_line
    from smartccs.jobrunner import load_config
    from smartccs.raycluster import init_ray

    overrides = flag_overrides(args, SCREEN_FLAGS)
    cfg = check_screen_job(load_config(ScreenJobConfig, None, args.store, overrides))
    init_ray(args.address)
    print(summary_line(run_screen_job(cfg)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ccs", description="Smart-CCS cervical screening platform on Ray"
    )
    parser.add_argument("--version", action="version", version=f"ccs {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logs (-vv)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="generate a synthetic multi-center cohort")
    p.add_argument("out", help="output folder (one sub-folder per center)")
    p.add_argument("--centers", type=int, default=3, help="take the first N profiles")
    p.add_argument("--center", action="append", help="a profile by name (repeatable)")
    p.add_argument("--slides-per-center", type=int, default=4)
    p.add_argument("--size", choices=SIZES, default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profiles", help="YAML file of center profiles (docs/synth.md)")
    p.add_argument(
        "--abnormal-density-scale",
        type=float,
        default=1.0,
        help="times as many abnormal cells per abnormal slide (tiny slides that a slide "
        "classifier can rank: 10 gives them a small slide's 20-100)",
    )
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("inspect", help="what a slide is: vendor, size, levels, mpp, tiles")
    p.add_argument("slide", help="local path or s3:// URI")
    p.add_argument("--mpp", type=float, default=None, help="override microns per pixel")
    p.add_argument("--json", action="store_true")
    add_store_flag(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("upload", help="validate a folder of slides and commit it as a batch")
    p.add_argument("dir", help="folder of slides, with or without a manifest.json")
    p.add_argument("--center", required=True)
    p.add_argument("--batch", required=True)
    add_store_flag(p)
    p.add_argument(
        "--submit",
        metavar="URL",
        help="then register it with the service at URL (a batch already committed with the "
        "folder's very slides is only registered)",
    )
    p.add_argument("--token", help="the center's service token (default: $CCS_TOKEN)")
    p.add_argument("--adapt", choices=METHODS, help="with --submit")
    p.add_argument("--wait", action="store_true", help="with --submit: follow it to the end")
    p.add_argument(
        "--break-lease",
        action="store_true",
        help="take over the batch from an upload that is known to be dead, even if its lease "
        "looks alive (another host's upload stops heartbeating after a minute anyway)",
    )
    p.set_defaults(func=cmd_upload)

    p = sub.add_parser(
        "token",
        help="a new service token for a center: the token alone on stdout "
        "(TOKEN=$(ccs token CENTER)), its service config entry on stderr",
    )
    p.add_argument("center")
    p.add_argument(
        "--reviewer",
        metavar="NAME",
        help="a cytologist's token for the review workstation: their sign-offs carry NAME",
    )
    p.add_argument("--json", action="store_true", help="print {center, token, digest} on stdout")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("adapt", help="a center's adapted states: history, or roll back")
    p.add_argument("action", choices=("history", "rollback"))
    p.add_argument("center")
    p.add_argument("--to", metavar="VERSION", help="rollback: the version to restore")
    add_store_flag(p)
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser(
        "labels", help="publish cell annotations (Parquet) for a committed batch, for training"
    )
    p.add_argument("cells", help="Parquet: slide_id, class, level-0 x0 y0 x1 y1 per cell")
    p.add_argument("--center", required=True)
    p.add_argument("--batch", required=True)
    add_store_flag(p)
    p.set_defaults(func=cmd_labels)

    p = sub.add_parser("submit", help="submit a job (jobs/<NAME>.py) to a Ray cluster")
    p.add_argument("name", metavar="NAME", help="job entrypoint: pretrain, finetune_detector, ...")
    p.add_argument("--config", required=True, help="the job's YAML (any path)")
    p.add_argument(
        "--address",
        default=None,
        help="Ray job server (default: $RAY_ADDRESS or http://127.0.0.1:8265); token from "
        "RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token",
    )
    p.add_argument(
        "--store", default=None, help="override the config's store URI (local path or s3://...)"
    )
    p.add_argument(
        "--working-dir", default=None, help="uploaded with the job (default: the repository root)"
    )
    p.add_argument(
        "--env",
        action="append",
        type=_env_pair,
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for the job (repeatable)",
    )
    p.add_argument("--no-wait", action="store_true", help="return once submitted; no logs")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser(
        "demo",
        help="the main job: the Smart-CCS study (pretraining, finetuning, screening with and "
        "without adaptation, ablation report) on a synthetic cohort, local Ray and store",
    )
    add_store_flag(p)
    p.add_argument("--config", default=None, help="a StudyConfig YAML (overrides the defaults)")
    p.add_argument("--cohort-dir", default=None, help="where slides are generated (./ccs-cohort)")
    p.add_argument("--centers", type=int, default=None, help="first N built-in centers (5)")
    p.add_argument("--slides-per-center", type=int, default=None, help="(12)")
    p.add_argument("--size", choices=SIZES, default=None, help="slide size (tiny)")
    p.add_argument(
        "--abnormal-density-scale",
        type=float,
        default=None,
        help="abnormal cells per abnormal slide, times the profiles' (10; 1: their own)",
    )
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--adapt", choices=ADAPTIVE_METHODS, default=None, help="w/ P&A's method")
    p.add_argument("--address", default=None, help="Ray address (default: a local Ray)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "screen", help="screen committed batches into the result tables (local door to jobs.screen)"
    )
    add_flags(p, SCREEN_FLAGS)  # the same table as python -m jobs.screen
    p.add_argument("--store", default=None, help="store URI (default: the URIs' root, $CCS_STORE)")
    p.add_argument("--address", default=None, help="Ray address (default: a local Ray)")
    p.set_defaults(func=cmd_screen)

    p = sub.add_parser(
        "evaluate", help="score committed screening results against ground truth; write a report"
    )
    p.add_argument("results", metavar="RESULTS", help="store root: local path or s3://...")
    p.add_argument(
        "--labels",
        required=True,
        help="ground truth: RESULTS itself (or another store root) for the manifests' grades, "
        "'reviews' for each slide's current review in RESULTS (unsatisfactory ones left out), "
        "or a CSV/Parquet file with center,batch,slide_id,grade",
    )
    p.add_argument("--out", required=True, help="report folder (report.html, metrics.json)")
    p.add_argument("--center", action="append", help="only this center (repeatable)")
    p.add_argument("--batch", action="append", help="only this batch id (repeatable)")
    p.add_argument(
        "--model",
        metavar="NAME[/VERSION]",
        help="only the batches this classifier screened (default: the one classifier of the "
        "batches with ground truth; each batch's latest committed run)",
    )
    p.add_argument("--max-slides", type=int, default=50, help="slides with per-slide figures")
    p.set_defaults(func=cmd_evaluate)

    from smartccs.deploy.commands import add_parser as add_deploy_parser

    add_deploy_parser(sub)  # ccs deploy policy|rayservice|sizing (docs/deploy.md)
    from smartccs.models.commands import add_parser as add_models_parser

    add_models_parser(sub)  # ccs models import (docs/models.md)
    from smartccs.results.review_commands import add_parser as add_reviews_parser

    add_reviews_parser(sub)  # ccs reviews export-labels (docs/results.md)
    return parser


def _fail(message: str, code: int = 1) -> int:
    lines = message.strip().splitlines() or ["unknown error"]
    print(f"ccs: error: {lines[0]}", file=sys.stderr)
    for line in lines[1:]:
        print(f"  {line}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CCSError as exc:
        return _fail(str(exc))
    except ValidationError as exc:
        return _fail(describe_validation_error(exc))
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        return _fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as exc:
        if os.environ.get("CCS_DEBUG"):
            raise
        return _fail(f"unexpected {type(exc).__name__}: {exc} (set CCS_DEBUG=1 for the traceback)")


if __name__ == "__main__":
    sys.exit(main())
