"""The screening engine and ``jobs.screen``: committed batches in, result tables out.

Real parts: the shared local Ray, Ray Data, OpenSlide on synthetic pyramidal slides, the store
on disk, the Parquet tables read back by DuckDB and pandas. The models are tiny real artifacts
with random weights (tests/toy_models.py): their predictions mean nothing, the pipeline
around them is what is pinned here.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from smartccs import layout
from smartccs.batches import commit_batch, load_batch, resolve_batches
from smartccs.checksums import sha256_file
from smartccs.data.tiles import slide_rows
from smartccs.engine.job import ScreenJobConfig, resolve, run_screen_job
from smartccs.engine.stream import cell_stream, embedding_dim
from smartccs.errors import CCSError
from smartccs.manifest import Manifest, SlideEntry
from smartccs.metrics.operating_point import operating_point
from smartccs.models.detector import SQUAMOUS_KINDS
from smartccs.models.refs import ModelRef
from smartccs.results.schema import THRESHOLD_CENTER
from smartccs.results.tables import read_commit, read_table
from smartccs.screening.bags import BagCollector
from smartccs.screening.cell_rows import TILE_ROW
from smartccs.screening.slides import AdequacyConfig, SlideClassifier
from smartccs.screening.squamous import count_squamous
from smartccs.screening.threshold import ThresholdConfig, carried_threshold
from smartccs.slide.reader import open_slide
from smartccs.slide.tiling import TilingConfig, plan_tiles, read_tile
from smartccs.store import Store, StoreConfig
from smartccs.upload import upload_batch

sys.path.insert(0, str(Path(__file__).parent))
from cli import run_ccs
from toy_models import TOY_TILING, save_toy_models, toy_screening

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("ray_session")]


@pytest.fixture(scope="module")
def cohort_store(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Store:
    """The tiny cohort's two centers as batches, a third batch with a truncated slide, and toy
    models."""
    store = Store(StoreConfig(uri=str(tmp_path_factory.mktemp("screen") / "store")))
    dirs = sorted(p.parent for p in tiny_cohort.glob("*/manifest.json"))
    for d in dirs:
        upload_batch(d, center=d.name, batch="b1", store=store, progress=False)
    good = Manifest.loads((dirs[0] / "manifest.json").read_bytes()).slides[0]
    data = (dirs[0] / good.path).read_bytes()
    broken = tmp_path_factory.mktemp("broken") / "broken.svs"
    broken.write_bytes(data[: len(data) // 3])  # truncated mid-file
    prefix = layout.incoming("c9", "b1")
    store.put_file(dirs[0] / good.path, f"{prefix}/{good.path}")
    store.put_file(broken, f"{prefix}/broken.svs")
    entry = SlideEntry(slide_id="broken", path="broken.svs", sha256=sha256_file(broken),
                       bytes=broken.stat().st_size)  # fmt: skip
    commit_batch(store, Manifest(center="c9", batch="b1", slides=[good, entry]))
    save_toy_models(store)
    return store


@pytest.fixture(scope="module")
def first_run(cohort_store: Store, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("run1")
    return run_screen_job(
        ScreenJobConfig(store=cohort_store.config, run_id="first", screening=toy_screening(tmp))
    )


def _manifest_slides(store: Store) -> set[tuple[str, str, str]]:
    return {
        (r["center"], r["batch"], r["slide_id"]) for r in slide_rows(resolve_batches(store, []))
    }


def test_every_slide_gets_one_row_and_its_cells_are_queryable(cohort_store: Store, first_run):
    slides = read_table(cohort_store, "slides").to_pylist()
    keys = [(r["center"], r["batch"], r["slide_id"]) for r in slides]
    assert sorted(keys) == sorted(_manifest_slides(cohort_store)), "each slide exactly once"
    assert {b.run_id for b in first_run.batches} == {"first"}
    cells = read_table(cohort_store, "cells").to_pylist()
    for row in slides:
        if row["status"] == "failed":
            continue
        assert row["status"] == "screened" and row["adequate"]
        assert row["tiles_read"] == row["n_tiles"] > 0 and row["tiles_failed"] == 0
        assert abs(row["score"] - (1 - row["p_nilm"])) < 1e-6
        assert row["positive"] == (row["score"] >= row["threshold"])
        assert row["classifier"].startswith("classifier/v") and row["screen_seconds"] > 0
        mine = [
            c for c in cells if (c["center"], c["slide_id"]) == (row["center"], row["slide_id"])
        ]
        assert len(mine) == row["n_cells"] > 0
        for c in mine:
            assert c["x1"] > c["x0"] and c["y1"] > c["y0"] and c["width_um"] > 0
        ranks = {(c["cell_class"], c["rank"]) for c in mine}
        assert len(ranks) == len(mine), "one cell per class rank"


def test_a_broken_slide_is_one_failed_row_and_its_batch_goes_on(cohort_store: Store, first_run):
    rows = read_table(cohort_store, "slides", centers=["c9"]).to_pylist()
    by_id = {r["slide_id"]: r for r in rows}
    assert set(by_id) == {"broken", next(k for k in by_id if k != "broken")}
    bad = by_id.pop("broken")
    assert bad["status"] == "failed" and "broken.svs" in bad["error"]
    assert bad["score"] is None and bad["p_nilm"] is None and bad["positive"] is None
    [good] = by_id.values()
    assert good["status"] == "screened" and good["score"] is not None


def test_tables_read_with_their_partitions_in_duckdb_and_pandas(cohort_store: Store, first_run):
    import duckdb
    import pandas as pd

    root = cohort_store.config.uri
    n = duckdb.sql(
        f"SELECT center, count(*) AS n FROM read_parquet('{root}/results/slides/*/*/*.parquet', "
        "hive_partitioning=true, hive_types_autocast=false) GROUP BY center ORDER BY center"
    ).fetchall()
    expected = {}
    for c, _, _ in _manifest_slides(cohort_store):
        expected[c] = expected.get(c, 0) + 1
    assert dict(n) == expected
    cells = pd.read_parquet(f"{root}/results/cells", dtype_backend="pyarrow")
    assert {"center", "batch", "slide_id", "cell_class", "score"} <= set(cells.columns)
    assert set(cells["center"].astype(str)) <= set(expected)


def test_screening_a_batch_again_replaces_its_rows(cohort_store: Store, first_run, tmp_path):
    before = read_table(cohort_store, "slides")
    center = next(b.center for b in first_run.batches if b.center != "c9")
    again = run_screen_job(
        ScreenJobConfig(
            store=cohort_store.config,
            batches=[f"{center}/b1"],
            run_id="second",
            screening=toy_screening(tmp_path),
        )
    )
    assert [(b.center, b.run_id) for b in again.batches] == [(center, "second")]
    after = read_table(cohort_store, "slides")
    assert after.num_rows == before.num_rows, "replaced, not appended"
    runs = {(r["center"], r["run_id"]) for r in after.to_pylist()}
    assert (center, "second") in runs and (center, "first") not in runs
    assert read_commit(cohort_store, center, "b1").run_id == "second"
    cells = read_table(cohort_store, "cells", centers=[center]).to_pylist()
    assert {c["run_id"] for c in cells} == {"second"}


def test_too_few_squamous_cells_is_inadequate_not_negative(cohort_store: Store, tmp_path):
    store = Store(StoreConfig(uri=str(tmp_path / "copy")))
    ref = load_batch(cohort_store, "c9", "b1")
    for key in cohort_store.list(ref.prefix) + cohort_store.list("models"):
        store.write_bytes(key, cohort_store.read_bytes(key))
    strict = toy_screening(tmp_path).model_copy(
        update={"adequacy": AdequacyConfig(min_squamous=10**9)}
    )
    run_screen_job(ScreenJobConfig(store=store.config, screening=strict))
    rows = {r["slide_id"]: r for r in read_table(store, "slides").to_pylist()}
    good = next(r for k, r in rows.items() if k != "broken")
    assert good["status"] == "inadequate" and good["adequate"] is False
    assert good["score"] is not None and "squamous" in good["error"]
    assert "pro-rated to the 1 mm² scanned" in good["error"], "a tiny slide is 1 mm x 1 mm"
    assert rows["broken"]["status"] == "failed"


def test_each_batch_is_called_at_its_center_s_carried_threshold(tiny_cohort: Path, tmp_path):
    # A classifier whose validation scores sat far from anything the toy head gives: the rows
    # must carry the operating point to the center from the slides screened there, this batch's
    # and the committed earlier batches' (never the batch being re-run), and say so.
    store = Store(StoreConfig(uri=str(tmp_path / "store")))
    folder = sorted(p.parent for p in tiny_cohort.glob("*/manifest.json"))[0]
    for batch in ("b1", "b2"):
        upload_batch(folder, center="c1", batch=batch, store=store, progress=False)
    y = np.array([False] * 6 + [True] * 6)
    op = operating_point(y, np.r_[np.linspace(0.01, 0.05, 6), np.linspace(0.1, 0.3, 6)], 0.9)
    save_toy_models(store, threshold=op.threshold, operating_point=op)
    screening = toy_screening(tmp_path).model_copy(
        update={"threshold": ThresholdConfig(min_slides=2)}
    )

    def screen(batch: str) -> list[dict]:
        cfg = ScreenJobConfig(store=store.config, batches=[f"c1/{batch}"], screening=screening)
        run_screen_job(cfg)
        return read_table(store, "slides", batches=[batch]).to_pylist()

    first = screen("b1")
    n = len(first)
    second = screen("b2")
    again = screen("b1")
    for rows, slides, history in ((first, n, []), (second, 2 * n, first), (again, 2 * n, second)):
        scores = [r["score"] for r in history + rows]
        want = carried_threshold(op, op.threshold, scores, screening.threshold)
        assert {r["threshold_source"] for r in rows} == {THRESHOLD_CENTER}
        assert {r["threshold_slides"] for r in rows} == {slides}
        assert [r["threshold"] for r in rows] == pytest.approx([want.value] * len(rows))
        assert all(r["positive"] == (r["score"] >= r["threshold"]) for r in rows)
    assert first[0]["threshold"] != pytest.approx(op.threshold), "carried, not the stored one"


def test_the_squamous_estimate_is_the_pixel_count_of_the_slide_s_tiles(
    cohort_store: Store, tiny_cohort: Path, first_run
):
    """The row's ``n_squamous`` is ``count_squamous`` over the tiles the engine read (on the
    detector's grid), whatever the model, and it tracks the generator's ground truth."""
    rows = [r for r in read_table(cohort_store, "slides").to_pylist() if r["center"] != "c9"]
    assert len(rows) == 4
    for row in rows:
        folder = tiny_cohort / row["center"]
        slide = open_slide(next((folder / "slides").glob(f"{row['slide_id']}.*")))
        tiles = [read_tile(slide, t, TOY_TILING) for t in plan_tiles(slide, TOY_TILING).tiles]
        assert row["n_squamous"] == int(count_squamous(np.stack(tiles), 1.0).sum()) > 0
        truth = pq.read_table(folder / "ground_truth" / "slides.parquet").to_pylist()
        t = next(sum(r[f"n_{k}"] for k in SQUAMOUS_KINDS) for r in truth
                 if r["slide_id"] == row["slide_id"])  # fmt: skip
        assert abs(row["n_squamous"] - t) <= 0.5 * t, (row["slide_id"], row["n_squamous"], t)


def _scorer_actors(dashboard: str) -> dict[str, int]:
    from ray.util.state import list_actors

    # the shared Ray's dashboard by address: other Rays may run on this machine
    alive = list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], limit=1000)
    return {a.actor_id: a.pid for a in alive if "CellScorer" in a.class_name}


def test_killed_scorer_actor_still_gives_every_tile_exactly_once(
    cohort_store: Store, tmp_path, ray_session: str
):
    """SIGKILL the detector actor after its first output: Ray Data restarts it and retries its
    work; every slide still ends complete, with each tile counted once."""
    rows = slide_rows([r for r in resolve_batches(cohort_store, []) if r.center != "c9"])
    classifier = SlideClassifier(cohort_store, ModelRef(name="classifier", version="latest"))
    cfg = toy_screening(tmp_path, tiles_per_call=2)

    def run(kill: bool) -> dict:
        ds = cell_stream(cohort_store, rows, classifier.detector, classifier.cells, cfg.stream,
                         cfg.scorers)  # fmt: skip
        collector = BagCollector(classifier.top_k, embedding_dim(cohort_store, classifier.detector))
        bags, killed = [], None
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            if kill and killed is None:
                [(actor_id, pid)] = _scorer_actors(ray_session).items()
                os.kill(pid, signal.SIGKILL)
                killed = actor_id
            bags += collector.add(batch)[0]
        bags += collector.finish([(r["center"], r["batch"], r["slide_id"]) for r in rows])
        if kill:
            assert killed is not None and killed not in _scorer_actors(ray_session)
        return {b.key: b for b in bags}

    clean, survived = run(kill=False), run(kill=True)
    assert set(survived) == set(clean) == {(r["center"], r["batch"], r["slide_id"]) for r in rows}
    for key, bag in survived.items():
        assert bag.errors == [] and bag.tiles_read == bag.n_tiles == clean[key].n_tiles
        assert bag.n_squamous == clean[key].n_squamous, "no tile counted twice"
        assert bag.mask.sum() == clean[key].mask.sum()


def test_a_scorer_s_memory_does_not_grow_with_the_tiles_it_screens(
    cohort_store: Store, tmp_path, ray_session: str
):
    """One scorer actor screens the tiny cohort three times over, cut fine (256 px tiles at
    0.25 µm/px, some 420 MB of tile pixels). Its RSS, sampled while it runs, rises while its
    bounded caches fill during the first pass (slide handles, OpenSlide's tile cache, the
    allocator's pools) and then by far less than the pixels it reads in the next two: what a
    slide costs a scorer is one call's tiles, whatever the slide's size
    (``bench/full_slide.py`` screens a 20 mm slide)."""
    import threading

    import psutil

    fine = TilingConfig(target_mpp=0.25, tile_px=256)
    names = ("fine-encoder", "fine-detector", "fine-classifier")
    classifier = SlideClassifier(
        cohort_store, save_toy_models(cohort_store, names=names, tiling=fine)
    )
    rows = slide_rows([r for r in resolve_batches(cohort_store, []) if r.center != "c9"]) * 3
    cfg = toy_screening(tmp_path)
    ds = cell_stream(cohort_store, rows, classifier.detector, classifier.cells, cfg.stream,
                     cfg.scorers)  # fmt: skip
    tiles, samples, pid = 0, [], []  # samples: (tiles the driver has seen, the scorer's RSS)
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            if pid:
                samples.append((tiles, psutil.Process(pid[0]).memory_info().rss))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            if not pid:
                [scorer] = _scorer_actors(ray_session).values()
                pid.append(scorer)
            tiles += int((batch["class_index"] == TILE_ROW).sum())
    finally:
        stop.set()
        sampler.join()
    assert tiles > 1500, "enough pixels that holding them would show"
    first_pass = [rss for n, rss in samples if n <= tiles / 3]
    after = max(n for n, _ in samples if n <= tiles / 3)
    growth = max(rss for _, rss in samples) - max(first_pass)
    pixels = (tiles - after) * fine.tile_px**2 * 3
    assert growth < pixels / 4, f"RSS +{growth / 2**20:.0f} MB over {pixels / 2**20:.0f} MB read"


def test_ccs_screen_takes_batch_and_model_uris(cohort_store: Store, tmp_path):
    import ray

    root = cohort_store.config.uri
    res = run_ccs(
        "screen", "--batch", f"{root}/incoming/c9/b1", "--model", f"{root}/models/classifier",
        "--run-id", "from-cli", "--min-squamous", "1",
        "--address", ray.get_runtime_context().gcs_address,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "run from-cli: 2 slides in 1 batches" in res.stdout and "1 failed" in res.stdout
    assert read_commit(cohort_store, "c9", "b1").run_id == "from-cli"
    bad = run_ccs("screen", "--batch", f"{root}/incoming/c9", "--store", root)
    assert bad.returncode == 1 and "expected 'center/batch'" in bad.stderr


def test_batch_and_model_uris_name_the_store():
    store, ids, screening = resolve(
        ScreenJobConfig(
            batches=["s3://bkt/ccs/incoming/a/b1", "a/b2"],
            model="s3://bkt/ccs/models/classifier/v3",
        )
    )
    assert store.config.uri == "s3://bkt/ccs" and ids == ["a/b1", "a/b2"]
    assert (screening.classifier_model, screening.classifier_version) == ("classifier", "v3")
    with pytest.raises(CCSError, match="different stores"):
        resolve(ScreenJobConfig(batches=["/x/incoming/a/b", "/y/incoming/a/b"]))
    assert layout.locate("incoming/a/b", "incoming") == (None, ["a", "b"])


@pytest.mark.parametrize("name", ["screen-demo", "screen-prod"])
def test_screen_configs_validate(name: str):
    import yaml

    raw = yaml.safe_load((Path(__file__).parents[1] / f"jobs/configs/{name}.yaml").read_text())
    cfg = ScreenJobConfig.model_validate(raw)
    store, ids, screening = resolve(cfg)
    assert screening.classifier_model == "classifier" and ids == []
    if name == "screen-prod":
        assert store.config.uri.startswith("s3://") and screening.scorers.gpus >= 1
        assert screening.adequacy.min_squamous == 5000, "Bethesda, liquid-based"
    else:
        assert screening.scorers.gpus == 0 and screening.scorers.fused


def test_screen_then_evaluate_writes_the_report(cohort_store: Store, first_run, tmp_path):
    from smartccs.evaluation.run import run_evaluation

    out = tmp_path / "report"
    evaluation = run_evaluation(
        cohort_store, out, centers=[b.center for b in first_run.batches if b.center != "c9"],
        max_slides=2, progress=False,
    )  # fmt: skip
    overall = evaluation.overall
    assert overall.n_slides == len(_manifest_slides(cohort_store)) - 2  # without c9's two
    for name in ("report.md", "report.html", "metrics.json"):
        assert (out / name).stat().st_size > 0
    pngs = sorted(p.name for p in out.rglob("*.png"))
    assert any("heatmap" in p for p in pngs) and any("cells" in p for p in pngs), pngs
    assert "heatmap.png" in (out / "report.md").read_text()
