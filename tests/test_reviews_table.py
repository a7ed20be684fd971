"""The reviews table: append-only sign-offs, latest is current; its two uses (evaluation truth,
cell labels for finetuning). No Ray: local stores (and moto's S3 for the writes)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli import assert_one_line_error, run_ccs
from pydantic import ValidationError
from result_rows import write

from smartccs import layout
from smartccs.batches import commit_batch, load_batch
from smartccs.errors import describe_validation_error
from smartccs.evaluation.run import load_truth, run_evaluation
from smartccs.labels import CELLS_FILE, put_cell_labels
from smartccs.manifest import Manifest, SlideEntry
from smartccs.results.reviews import (
    CellCorrection,
    Review,
    ReviewSubmission,
    append_review,
    current_reviews,
    read_reviews,
    reviewed_cell_labels,
)
from smartccs.results.schema import REVIEWS, REVIEWS_SCHEMA_VERSION
from smartccs.store import Store

T0 = datetime(2026, 11, 21, 9, 30, tzinfo=UTC)
BOX = {"x0": 100.0, "y0": 50.0, "x1": 140.0, "y1": 90.0}


def correction(verdict: str, box: dict = BOX, cell_class: str = "ASC-US", rank: int = 0) -> dict:
    return {"cell_class": cell_class, "rank": rank, **box, "verdict": verdict}


def review(
    review_id: str,
    slide_id: str = "s1",
    category: str = "HSIL",
    minutes: float = 0,
    corrections: list[dict] = (),
    center: str = "c1",
    batch: str = "b1",
) -> Review:
    submission = ReviewSubmission(
        slide_id=slide_id, category=category, comment="seen", corrections=list(corrections)
    )
    return Review.of(
        submission,
        center=center,
        batch=batch,
        review_id=review_id,
        reviewer="dr. a",
        reviewed_at=T0 + timedelta(minutes=minutes),
        run_id="run-1",
        classifier="mil/1",
        score=0.75,
    )


def review_files(store: Store) -> list[str]:
    return [k for k in store.list("results/reviews") if k.endswith(".parquet")]


def test_an_appended_review_reads_back_as_one_row_with_its_partition_and_corrections(
    any_store: Store,
):
    written = review("r1", corrections=[correction("HSIL")])
    key = append_review(any_store, written)
    assert key == "results/reviews/center=c1/batch=b1/r1.parquet"
    assert review_files(any_store) == [key]
    table = read_reviews(any_store)
    assert table.column_names == ["center", "batch", *REVIEWS.names]
    (row,) = table.to_pylist()
    assert row["center"] == "c1" and row["batch"] == "b1" and row["reviewer"] == "dr. a"
    assert row["reviewed_at"] == T0 and row["category"] == "HSIL" and row["run_id"] == "run-1"
    assert row["corrections"] == [correction("HSIL")]
    assert Review.model_validate({k: v for k, v in row.items() if v is not None}) == written
    meta = pq.read_schema(any_store.open_input(key)).metadata
    assert meta[b"smartccs.table"] == b"reviews"
    assert meta[b"smartccs.schema_version"] == REVIEWS_SCHEMA_VERSION.encode()


def test_a_retried_append_of_the_same_review_id_adds_no_row(any_store: Store):
    """A retried POST: the same review, even stamped again by the server, is one row."""
    first = append_review(any_store, review("r1"))
    again = review("r1").model_copy(update={"reviewed_at": T0 + timedelta(seconds=3)})
    assert append_review(any_store, again) == first
    assert append_review(any_store, review("r1")) == first
    assert review_files(any_store) == [first]
    assert read_reviews(any_store).num_rows == 1


def test_a_review_id_reused_for_another_sign_off_is_refused_not_dropped(any_store: Store):
    from smartccs.results.reviews import ReviewConflict

    first = append_review(any_store, review("r1", category="HSIL"))
    with pytest.raises(ReviewConflict, match="'r1' already holds another sign-off"):
        append_review(any_store, review("r1", category="NILM"))
    assert review_files(any_store) == [first]
    assert read_reviews(any_store)["category"].to_pylist() == ["HSIL"]


def test_retries_racing_each_other_still_write_one_row(any_store: Store):
    """Retries of one sign-off arriving at once, each stamped by the server at its own time,
    land on the review id's one name: create-if-absent lets exactly one write."""
    from concurrent.futures import ThreadPoolExecutor

    copies = [
        review("r9").model_copy(update={"reviewed_at": T0 + timedelta(milliseconds=i)})
        for i in range(8)
    ]
    with ThreadPoolExecutor(8) as pool:
        keys = set(pool.map(lambda r: append_review(any_store, r), copies))
    assert len(keys) == 1 and review_files(any_store) == list(keys)
    assert read_reviews(any_store).num_rows == 1


def test_a_slide_s_history_keeps_every_row_and_the_latest_is_current(local_store: Store):
    append_review(local_store, review("r3", category="NILM", minutes=20))  # written out of order
    append_review(local_store, review("r1", category="HSIL", minutes=0))
    append_review(local_store, review("r2", category="unsatisfactory", minutes=10))
    append_review(local_store, review("r4", slide_id="s2", category="LSIL", minutes=5))
    append_review(local_store, review("r5", category="SCC", batch="b2", minutes=30))
    history = read_reviews(local_store, batches=["b1"])
    assert history["review_id"].to_pylist() == ["r1", "r4", "r2", "r3"]  # oldest first
    current = current_reviews(local_store)
    got = {(r["batch"], r["slide_id"]): r["category"] for r in current.to_pylist()}
    assert got == {("b1", "s1"): "NILM", ("b1", "s2"): "LSIL", ("b2", "s1"): "SCC"}
    assert current_reviews(local_store, centers=["c1"], batches=["b2"])[
        "review_id"
    ].to_pylist() == ["r5"]
    assert read_reviews(local_store, centers=["elsewhere"]).num_rows == 0


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"category": "CIN2"}, "category"),
        ({"corrections": [correction("HSIL", cell_class="NILM")]}, "corrections.0.cell_class"),
        ({"corrections": [correction("debris")]}, "corrections.0.verdict"),
        ({"corrections": [correction("HSIL", {**BOX, "x1": 100.0})]}, "corrections.0.x1"),
        ({"corrections": [correction("HSIL", {**BOX, "y1": 10.0})]}, "corrections.0.y1"),
        ({"corrections": [correction("HSIL", {**BOX, "x0": float("nan")})]}, "corrections.0.x0"),
        ({"corrections": [correction("HSIL"), correction("LSIL")]}, "corrections"),
        ({"comment": "x" * 2001}, "comment"),
        ({"slide_id": "../s1"}, "slide_id"),
        ({"reviewer_note": "hi"}, "reviewer_note"),
    ],
)
def test_a_bad_submission_is_a_validation_error_naming_the_field(change: dict, field: str):
    body = {"slide_id": "s1", "category": "HSIL", "comment": None, "corrections": []} | change
    with pytest.raises(ValidationError) as err:
        ReviewSubmission.model_validate(body)
    assert describe_validation_error(err.value).startswith(f"{field}: "), err.value


def test_the_server_s_fields_are_checked_too():
    with pytest.raises(ValidationError, match="reviewed_at"):
        Review.model_validate(review("r1").model_dump() | {"reviewed_at": datetime(2026, 1, 1)})
    with pytest.raises(ValidationError, match="review_id"):
        review("r/1")
    assert CellCorrection.model_validate(correction("not_a_cell")).verdict == "not_a_cell"


def test_duckdb_reads_the_reviews_folder_as_it_is_with_hive_partitioning(local_store: Store):
    append_review(local_store, review("r1", category="HSIL", corrections=[correction("HSIL")]))
    append_review(local_store, review("r2", category="NILM", minutes=5))
    append_review(local_store, review("r3", slide_id="s2", category="LSIL", batch="2026-11-21"))
    # what a writer killed mid-write leaves: a hidden staging file, which no glob matches
    folder = local_store.path(layout.results("reviews", "c1", "b1"))
    with open(os.path.join(folder, ".20261121T100000000000-r9.parquet.tmp-abc"), "wb") as f:
        f.write(b"PAR1 half a file")
    glob = f"{local_store.root}/results/reviews/*/*/*.parquet"
    rows = duckdb.sql(
        f"""SELECT center, batch, slide_id, category, len(corrections) AS n
            FROM read_parquet('{glob}', hive_partitioning=true, hive_types_autocast=false)
            QUALIFY row_number() OVER (PARTITION BY center, batch, slide_id
                                       ORDER BY reviewed_at DESC) = 1
            ORDER BY batch, slide_id"""
    ).fetchall()
    assert rows == [("c1", "2026-11-21", "s2", "LSIL", 0), ("c1", "b1", "s1", "NILM", 0)]
    verdicts = duckdb.sql(
        f"SELECT unnest(corrections).verdict FROM read_parquet('{glob}', hive_partitioning=true)"
    ).fetchall()
    assert verdicts == [("HSIL",)]


def test_labels_reviews_makes_each_slide_s_current_review_its_truth(local_store: Store):
    append_review(local_store, review("r1", slide_id="s1", category="HSIL"))
    append_review(local_store, review("r2", slide_id="s1", category="NILM", minutes=5))
    append_review(local_store, review("r3", slide_id="s2", category="unsatisfactory"))
    append_review(local_store, review("r4", slide_id="s3", category="LSIL", batch="b2"))
    append_review(local_store, review("r5", slide_id="s4", category="AGC", batch="b3"))
    truth, truth_store, source = load_truth(local_store, "reviews", [("c1", "b1"), ("c1", "b2")])
    assert sorted(truth.to_pylist(), key=lambda r: r["slide_id"]) == [
        {"center": "c1", "batch": "b1", "slide_id": "s1", "grade": "NILM"},
        {"center": "c1", "batch": "b2", "slide_id": "s3", "grade": "LSIL"},
    ]
    assert truth_store is local_store and source.endswith("/results/reviews")


def test_ccs_evaluate_labels_reviews_scores_the_model_against_its_reviewers(
    local_store: Store, tmp_path: Path
):
    write(local_store, "c1", "b1", run="run-1", score=0.75)  # s1 screened, s2 failed
    write(local_store, "c1", "b2", run="run-2", score=0.25)
    append_review(local_store, review("r1", category="HSIL"))
    append_review(local_store, review("r2", category="NILM", batch="b2"))
    append_review(local_store, review("r3", slide_id="s2", category="unsatisfactory"))
    evaluation = run_evaluation(
        local_store, tmp_path / "report", labels="reviews", max_slides=0, progress=False
    )
    g = evaluation.overall
    assert (g.n_slides, g.n_positive) == (2, 1) and g.binary.auc == 1.0
    assert evaluation.truth_source.startswith("reviews in ")
    assert (tmp_path / "report" / "report.html").exists()


@pytest.fixture
def batch_store(local_store: Store) -> Store:
    """A committed batch c1/b1 of slides s1, s2 (never read: labels only check the manifest)."""
    entries = []
    for slide_id in ("s1", "s2"):
        local_store.write_bytes(f"incoming/c1/b1/{slide_id}.svs", slide_id.encode())
        digest = hashlib.sha256(slide_id.encode()).hexdigest()
        entries.append(
            SlideEntry(slide_id=slide_id, path=f"{slide_id}.svs", bytes=2, sha256=digest)
        )
    commit_batch(local_store, Manifest(center="c1", batch="b1", slides=entries))
    return local_store


def labels_of(table: pa.Table) -> list[tuple]:
    return sorted(tuple(r.values()) for r in table.select(["slide_id", "class", *BOX]).to_pylist())


FAR = {"x0": 500.0, "y0": 500.0, "x1": 540.0, "y1": 540.0}
NEAR = {"x0": 102.0, "y0": 52.0, "x1": 142.0, "y1": 92.0}  # IoU with BOX about 0.82
APART = {"x0": 900.0, "y0": 900.0, "x1": 940.0, "y1": 940.0}


def test_export_labels_merges_reviewed_cells_and_drops_not_a_cell_overlaps(
    batch_store: Store, tmp_path: Path
):
    annotations = pa.table(
        {
            "slide_id": ["s1", "s1", "s2", "s2"],
            "class": ["ASC-US", "LSIL", "ASC-H", "AGC"],
            **{k: [BOX[k], FAR[k], BOX[k], APART[k]] for k in BOX},
        }
    )
    put_cell_labels(batch_store, load_batch(batch_store, "c1", "b1"), annotations)
    # s1: the old review is superseded by the current one, whose not_a_cell removes the BOX
    # annotation and whose HSIL verdict adds a new cell; s2: its ASC-H annotation is relabelled
    append_review(batch_store, review("r1", corrections=[correction("SCC", APART)]))
    append_review(
        batch_store,
        review(
            "r2",
            minutes=5,
            corrections=[correction("not_a_cell", NEAR), correction("HSIL", APART, rank=1)],
        ),
    )
    append_review(batch_store, review("r3", slide_id="s2", corrections=[correction("HSIL")]))
    assert labels_of(reviewed_cell_labels(batch_store, "c1", "b1")) == [
        ("s1", "HSIL", *APART.values()),
        ("s2", "HSIL", *BOX.values()),
    ]
    expected = [
        ("s1", "HSIL", *APART.values()),
        ("s1", "LSIL", *FAR.values()),
        ("s2", "AGC", *APART.values()),
        ("s2", "HSIL", *BOX.values()),
    ]
    out = tmp_path / "merged.parquet"
    res = run_ccs("reviews", "export-labels", "--batch", "c1/b1", "--store", batch_store.root,
                  "--out", str(out))  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert labels_of(pq.read_table(out)) == expected
    key = f"{layout.labels('c1', 'b1')}/{CELLS_FILE}"
    assert labels_of(pq.read_table(batch_store.path(key))) != expected  # --out: store untouched

    for _ in range(2):  # into the store; a second export changes nothing
        res = run_ccs("reviews", "export-labels", "--batch", "c1/b1", "--store", batch_store.root)
        assert res.returncode == 0, res.stderr
        assert "4 cell labels" in res.stdout and "2 from reviews" in res.stdout, res.stdout
        assert labels_of(pq.read_table(batch_store.path(key))) == expected
    assert [k for k in batch_store.list("labels") if "tmp" in k] == []


def test_export_labels_without_corrected_cells_or_of_an_unknown_slide_is_one_line_error(
    batch_store: Store,
):
    args = ("reviews", "export-labels", "--batch", "c1/b1", "--store", batch_store.root)
    append_review(batch_store, review("r1", category="NILM"))
    assert_one_line_error(run_ccs(*args), "c1/b1", "no corrected cells")
    append_review(batch_store, review("r2", slide_id="s9", corrections=[correction("HSIL")]))
    assert_one_line_error(run_ccs(*args), "'s9'", "not in the batch")
    assert not batch_store.exists(f"{layout.labels('c1', 'b1')}/{CELLS_FILE}")
    usage = run_ccs("reviews", "export-labels", "--batch", "c1")
    assert usage.returncode == 2 and "'c1' is not CENTER/BATCH" in usage.stderr, usage.stderr


def test_the_reviews_command_is_registered_without_importing_torch():
    code = (
        "import sys; from smartccs import cli; p = cli.build_parser(); "
        "p.parse_args(['reviews', 'export-labels', '--batch', 'c/b']); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
