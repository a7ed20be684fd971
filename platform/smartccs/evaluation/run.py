"""The evaluation entry point: read the committed result tables and the truth, write the report.

Used by ``ccs evaluate`` and ``python -m jobs.evaluate``; everything here is loading and
wiring, the numbers come from :func:`smartccs.evaluation.report.evaluate`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from smartccs.batches import BatchRef, load_batch
from smartccs.errors import CCSError, SlideError
from smartccs.evaluation.render import SlideOpener, write_report
from smartccs.evaluation.report import (
    Evaluation,
    EvaluationConfig,
    EvaluationError,
    evaluate,
    slide_outcomes,
    threshold_text,
)
from smartccs.evaluation.truth import (
    REVIEWS_SOURCE,
    TruthError,
    review_truth,
    slide_truth,
    truth_from_file,
)
from smartccs.labels import SlideBoxes, has_cell_labels, load_cell_labels
from smartccs.metrics.operating_point import OperatingPoint
from smartccs.models.artifacts import load_card
from smartccs.results.tables import read_table
from smartccs.slide.cache import SlideCache
from smartccs.slide.reader import Slide, open_slide
from smartccs.store import Store, StoreConfig

log = logging.getLogger(__name__)

__all__ = [
    "EvaluationJobConfig",
    "EvaluationJobResult",
    "run_evaluation",
    "run_evaluation_job",
    "summary_line",
]

TRUTH_FILE_SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq")


def _is_file_uri(labels: str) -> bool:
    return labels.lower().endswith(TRUTH_FILE_SUFFIXES)


def _other_store(store: Store, uri: str) -> Store:
    """A store at ``uri`` with the results store's S3 settings (same endpoint and keys)."""
    if urlparse(uri).scheme in ("s3", "s3a"):
        return Store(store.config.model_copy(update={"uri": uri}))
    return Store(StoreConfig(uri=uri))


def load_truth(
    store: Store, labels: str | None, partitions: Sequence[tuple[str, str]]
) -> tuple[pa.Table, Store | None, str]:
    """``(truth, truth store or None, description)``: the manifests' grades of ``store`` (when
    ``labels`` is None or names the same store root), the current reviews in ``store``
    (``labels`` is ``reviews``), the manifests of another store root, or a CSV/Parquet file
    (local, or an ``s3://`` object read with the results store's S3 settings)."""
    if labels is None:
        return slide_truth(store, partitions), store, f"manifests in {store.uri()}"
    if labels == REVIEWS_SOURCE:
        where = f"reviews in {store.uri('results', 'reviews')}"
        return review_truth(store, partitions), store, where
    if _is_file_uri(labels):
        if urlparse(labels).scheme in ("s3", "s3a"):
            parent = str(PurePosixPath(urlparse(labels).path).parent)
            holder = _other_store(store, f"s3://{urlparse(labels).netloc}{parent}")
            data = holder.read_bytes(PurePosixPath(labels).name)
            return truth_from_file(labels, data=data), None, labels
        return truth_from_file(Path(labels).expanduser()), None, labels
    other = _other_store(store, labels)
    if other.uri() == store.uri():
        return slide_truth(store, partitions), store, f"manifests in {store.uri()}"
    if other.protocol == "file" and not Path(other.root).is_dir():
        raise TruthError(f"{labels}: not a ground-truth file (.csv, .parquet) nor a store folder")
    return slide_truth(other, partitions), other, f"manifests in {other.uri()}"


def load_cell_truth(
    store: Store, partitions: Sequence[tuple[str, str]]
) -> dict[tuple[str, str, str], SlideBoxes]:
    """Cell annotations of those ``partitions`` that have them in ``store``'s ``labels/``."""
    refs = [load_batch(store, c, b) for c, b in partitions if has_cell_labels(store, c, b)]
    if not refs:
        return {}
    log.info("cell annotations for %d of %d batches", len(refs), len(partitions))
    return load_cell_labels(store, refs)


def store_slide_opener(store: Store, cache: SlideCache | None = None) -> SlideOpener:
    """Open a committed batch's slide by (center, batch, slide_id), through the slide cache."""
    refs: dict[tuple[str, str], BatchRef] = {}
    cache = cache or SlideCache.from_env()

    def open_store_slide(center: str, batch: str, slide_id: str) -> Slide:
        if (center, batch) not in refs:
            refs[(center, batch)] = load_batch(store, center, batch)
        ref = refs[(center, batch)]
        try:
            entry = ref.manifest.slide(slide_id)
        except KeyError:
            raise SlideError(f"{slide_id}: not in the manifest of {center}/{batch}") from None
        key = ref.slide_key(entry.path)
        local = cache.local_path(store, key, entry.sha256, entry.bytes)
        return open_slide(local, mpp_override=entry.mpp, name=f"{center}/{batch}/{entry.path}")

    return open_store_slide


def stored_operating_point(store: Store, classifier: str | None) -> OperatingPoint | None:
    """How the card of ``classifier`` (``name/version``, as the slides table names it) says
    its threshold was chosen, so the report sets the validation figures beside the ones it
    measures; None for a card from before operating points, or a model not in ``store``."""
    if not classifier or "/" not in classifier:
        return None
    name, version = classifier.rsplit("/", 1)
    try:
        raw = load_card(store, name, version).head.get("operating_point")
    except CCSError as exc:
        log.info("no operating point for %s: %s", classifier, str(exc).splitlines()[0])
        return None
    return OperatingPoint.model_validate(raw) if raw else None


Partition = tuple[str, str]

MODEL_HINT = (
    "evaluate one classifier at a time: --model NAME[/VERSION] (the model argument), or "
    "select its batches with --center/--batch"
)


def _columns(table: pa.Table, *names: str) -> list[tuple]:
    return list(zip(*(table[n].to_pylist() for n in names), strict=True))


def _partitions(table: pa.Table) -> list[Partition]:
    return sorted(set(_columns(table, "center", "batch")))


def _only(table: pa.Table, keep: set[Partition]) -> pa.Table:
    return table.filter(
        pa.array([p in keep for p in _columns(table, "center", "batch")], pa.bool_())
    )


def classifiers_by_partition(slides: pa.Table) -> dict[Partition, str | None]:
    """The classifier (``name/version``) whose run each batch's partition holds: one per
    partition, since a partition holds the batch's latest committed run (None: all failed)."""
    out: dict[Partition, str | None] = {}
    for c, b, name in _columns(slides, "center", "batch", "classifier"):
        out[(c, b)] = out.get((c, b)) or name
    return out


def _listing(models: dict[Partition, str | None]) -> str:
    """``a/v1 (c1/b1, c2/b1), b/v2 (c3/b1)``."""
    by_model: dict[str, list[str]] = {}
    for (c, b), name in sorted(models.items()):
        by_model.setdefault(name or "no classifier (every slide failed)", []).append(f"{c}/{b}")
    return ", ".join(f"{name} ({', '.join(parts)})" for name, parts in sorted(by_model.items()))


def _of_model(name: str | None, model: str) -> bool:
    if name is None:
        return False
    return name == model or ("/" not in model and name.startswith(f"{model}/"))


def select_model(
    slides: pa.Table, judged: set[Partition], model: str | None, where: str, truth_source: str
) -> set[Partition]:
    """The batches to evaluate: those of classifier ``model`` (``name`` or ``name/version``)
    when given; then the one classifier of the batches with ground truth (``judged``), and the
    batches without truth that it screened too. Batches without truth screened by another
    classifier are left out (logged): they would only have been counted. Several classifiers
    among the judged batches are one error listing each one's batches, and so is a choice
    without any judged batch (``where``, ``truth_source``: the results and truth, for it)."""
    models = classifiers_by_partition(slides)
    if model:
        chosen = {p: m for p, m in models.items() if _of_model(m, model)}
        if not chosen:
            raise EvaluationError(
                f"no committed results of classifier {model!r} in {where}; the results hold "
                f"{_listing(models)}"
            )
        models = chosen
    if not judged & models.keys():
        raise EvaluationError(
            f"no ground truth in {truth_source} for any screened slide of "
            f"{_listing(models)} in {where}"
        )
    names = {models[p] for p in judged if p in models} - {None}
    if len(names) > 1:
        shown = _listing({p: m for p, m in models.items() if p in judged})
        raise EvaluationError(
            f"the batches with ground truth were screened by several classifiers, {shown}: "
            f"{MODEL_HINT}"
        )
    keep = {p for p, m in models.items() if p in judged or m is None or m in names}
    left = {p: m for p, m in models.items() if p not in keep}
    if left:
        log.info("not evaluated (no ground truth, another classifier): %s", _listing(left))
    return keep


def run_evaluation(
    store: Store,
    out_dir: str | Path,
    labels: str | None = None,
    centers: Sequence[str] | None = None,
    batches: Sequence[str] | None = None,
    cfg: EvaluationConfig | None = None,
    max_slides: int = 50,
    *,
    model: str | None = None,
    progress: bool = True,
) -> Evaluation:
    """Evaluate the committed results in ``store`` (optionally only ``centers``/``batches``,
    and only the batches classifier ``model``, ``name[/version]``, screened) against ground
    truth, write the report into ``out_dir`` and return the evaluation.

    ``labels``: None or the store's own root for the manifests' grades, ``reviews`` for the
    store's current reviews, another store root, or a CSV/Parquet truth file
    (``smartccs.evaluation.truth``). Cell annotations come from the truth store's ``labels/``
    (the results store's when truth is a file or the reviews), where present. Each batch's
    partition holds its latest committed run; which batches are evaluated when several
    classifiers screened them: :func:`select_model`.
    """
    cfg = cfg or EvaluationConfig()
    centers = list(centers) if centers else None
    batches = list(batches) if batches else None
    slides = read_table(store, "slides", centers=centers, batches=batches)
    cells = read_table(store, "cells", centers=centers, batches=batches)
    scope = ""
    if centers:
        scope += f" for centers {', '.join(centers)}"
    if batches:
        scope += f" for batches {', '.join(batches)}"
    if slides.num_rows == 0:
        raise EvaluationError(f"no committed results in {store.uri('results', 'slides')}{scope}")
    partitions = _partitions(slides)
    truth, truth_store, source = load_truth(store, labels, partitions)
    if truth.num_rows == 0:
        raise EvaluationError(
            f"no ground truth for {', '.join(f'{c}/{b}' for c, b in partitions)} in {source}"
        )
    screened = set(_columns(slides, "center", "batch", "slide_id"))
    judged = {(c, b) for c, b, s in _columns(truth, "center", "batch", "slide_id")
              if (c, b, s) in screened}  # fmt: skip
    keep = select_model(slides, judged, model, store.uri("results", "slides") + scope, source)
    if len(keep) < len(partitions):
        slides, cells = _only(slides, keep), _only(cells, keep)
        partitions = _partitions(slides)
    cell_truth = load_cell_truth(truth_store or store, partitions)
    evaluation = evaluate(slides, cells, truth, cell_truth, cfg)
    op = stored_operating_point(store, evaluation.model.classifier)
    evaluation = evaluation.model_copy(
        update={
            "results_uri": store.uri("results"),
            "truth_source": source,
            "model": evaluation.model.model_copy(update={"operating_point": op}),
        }
    )
    write_report(
        evaluation,
        out_dir,
        outcomes=slide_outcomes(slides, truth),
        cells=cells,
        open_slide=store_slide_opener(store),
        max_slides=max_slides,
        progress=progress,
    )
    return evaluation


def summary_line(evaluation: Evaluation, report: str | Path | None = None) -> str:
    """One line on the overall group, for the CLI and the job."""
    g = evaluation.overall
    parts = [f"{g.n_slides} slides ({g.n_positive} abnormal)"]
    b = g.binary
    if b is not None:
        level = round(b.ci_level * 100)
        parts.append(
            f"AUC {b.auc:.3f} ({level}% CI {b.auc_ci_low:.3f}-{b.auc_ci_high:.3f}), "
            f"sensitivity {b.sensitivity:.3f} ({b.sensitivity_ci_low:.2f}-"
            f"{b.sensitivity_ci_high:.2f}), specificity {b.specificity:.3f} "
            f"({b.specificity_ci_low:.2f}-{b.specificity_ci_high:.2f}) at threshold "
            + threshold_text(
                b.threshold, b.threshold_min, b.threshold_max, evaluation.model.threshold_sources
            )
        )
    else:
        parts.append(f"no AUC: {g.binary_reason}")
    parts.append(f"{g.n_failed} failed, {g.n_rejected} rejected, {g.n_inadequate} inadequate")
    if report is not None:
        parts.append(f"report: {report}")
    return "evaluation: " + "; ".join(parts)


class EvaluationJobConfig(BaseModel):
    """``python -m jobs.evaluate --config jobs/configs/evaluate-demo.yaml``."""

    model_config = ConfigDict(extra="forbid")

    store: StoreConfig = StoreConfig()
    out: str = Field(default="./ccs-evaluation", description="report folder (driver's disk)")
    labels: str | None = Field(
        default=None,
        description="truth: null (the store's manifests), 'reviews' (its current reviews), a "
        "store root, or a file",
    )
    centers: list[str] = Field(default_factory=list, description="empty: every center")
    batches: list[str] = Field(default_factory=list, description="empty: every batch")
    model: str | None = Field(
        default=None,
        description="only the batches this classifier screened: 'name' or 'name/version'",
    )
    evaluation: EvaluationConfig = EvaluationConfig()
    max_slides: int = Field(default=50, ge=0, description="slides with per-slide figures")


class EvaluationJobResult(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    evaluation: Evaluation
    report: str


def run_evaluation_job(cfg: EvaluationJobConfig) -> EvaluationJobResult:
    out = Path(cfg.out).expanduser()
    evaluation = run_evaluation(
        Store(cfg.store),
        out,
        labels=cfg.labels,
        centers=cfg.centers,
        batches=cfg.batches,
        cfg=cfg.evaluation,
        max_slides=cfg.max_slides,
        model=cfg.model,
    )
    return EvaluationJobResult(evaluation=evaluation, report=str(out / "report.html"))
