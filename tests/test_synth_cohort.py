"""The generated cohort on disk: formats, manifests, ground truth and determinism."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import openslide
import pyarrow.parquet as pq
import pytest

from smartccs.errors import CCSError
from smartccs.manifest import Manifest
from smartccs.synth.cohort import generate_cohort
from smartccs.synth.cohort_summary import CohortSummary
from smartccs.synth.ground_truth import CELLS_SCHEMA, SLIDES_SCHEMA
from smartccs.synth.profiles import load_profiles
from smartccs.synth.scan import render_slide
from smartccs.synth.specimen import make_specimen
from smartccs.taxonomy import ABNORMAL_CLASSES, slide_grade

VENDOR = {"svs": "aperio", "tiff": "generic-tiff"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CohortSummary]:
    """Three centers (two internal, one external at 0.5 um/px), two tiny slides each."""
    out = tmp_path_factory.mktemp("cohort")
    summary = generate_cohort(
        out, centers=3, slides_per_center=2, size="tiny", seed=0, workers=2, progress=False
    )
    return out, summary


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


def test_summary_lists_every_center_and_slide(cohort: tuple[Path, CohortSummary]) -> None:
    out, summary = cohort
    assert summary.synthetic is True and summary.slides == 6
    assert [c.name for c in summary.centers] == [p.name for p in load_profiles(None)[:3]]
    assert {c.kind for c in summary.centers} == {"internal", "external"}
    for c in summary.centers:
        assert c.slides == 2 and sum(c.grades.values()) == 2
        assert set(c.grades) - {"NILM"}, "quota allocation gives every center an abnormal slide"
    text = summary.describe()
    assert text.startswith("SYNTHETIC cohort") and all(c.name in text for c in summary.centers)
    doc = json.loads((out / "cohort.json").read_text())
    assert doc["synthetic"] is True and doc["seed"] == 0


def test_every_slide_opens_with_its_profiles_vendor_and_mpp(
    cohort: tuple[Path, CohortSummary],
) -> None:
    out, _ = cohort
    for profile in load_profiles(None)[:3]:
        slides = sorted((out / profile.name / "slides").iterdir())
        assert len(slides) == 2
        for path in slides:
            assert path.suffix == f".{profile.scanner.format}"
            with openslide.OpenSlide(path) as s:
                assert s.properties["openslide.vendor"] == VENDOR[profile.scanner.format]
                assert float(s.properties["openslide.mpp-x"]) == pytest.approx(
                    profile.scanner.mpp, rel=1e-4
                )
                side = round(1000.0 / profile.scanner.mpp)
                assert s.dimensions == (side, side)
                assert s.level_count >= 2


def test_manifest_validates_and_checksums_match(cohort: tuple[Path, CohortSummary]) -> None:
    out, summary = cohort
    for c in summary.centers:
        folder = out / c.folder
        manifest = Manifest.loads((folder / "manifest.json").read_bytes())
        assert manifest.center == c.name and manifest.batch == "synth"
        assert [s.slide_id for s in manifest.slides] == [f"{c.name}-s0001", f"{c.name}-s0002"]
        for entry in manifest.slides:
            path = folder / entry.path
            assert entry.bytes == path.stat().st_size
            assert entry.sha256 == _sha(path)
        leftovers = [p.name for p in folder.rglob(".*")]
        assert not leftovers, "no partial files remain"


def test_ground_truth_tables_agree_with_manifest_and_slides(
    cohort: tuple[Path, CohortSummary],
) -> None:
    out, summary = cohort
    for c in summary.centers:
        folder = out / c.folder
        manifest = Manifest.loads((folder / "manifest.json").read_bytes())
        slides = pq.read_table(folder / "ground_truth" / "slides.parquet")
        cells = pq.read_table(folder / "ground_truth" / "cells.parquet")
        assert slides.schema.equals(SLIDES_SCHEMA, check_metadata=True)
        assert cells.schema.equals(CELLS_SCHEMA, check_metadata=True)
        rows = slides.to_pylist()
        for entry, row in zip(manifest.slides, rows, strict=True):
            assert (row["slide_id"], row["grade"], row["sha256"]) == (
                entry.slide_id,
                entry.grade,
                entry.sha256,
            )
            mine = cells.filter(cells["slide_id"].to_numpy() == entry.slide_id).to_pydict()
            assert slide_grade(mine["class"]) == entry.grade  # grade = most severe class
            assert row["n_cells"] == len(mine["class"])
            assert row["n_abnormal"] == sum(mine["is_abnormal"])
            x0, y0, x1, y1 = (np.array(mine[k]) for k in ("x0", "y0", "x1", "y1"))
            assert np.all((x0 >= 0) & (y0 >= 0) & (x0 < x1) & (y0 < y1))
            assert np.all((x1 <= row["width_px"]) & (y1 <= row["height_px"]))
            assert np.allclose(np.array(mine["x0_um"]) / row["mpp"], x0, atol=1.0)


def test_abnormal_cell_boxes_hold_dark_nuclei_on_bright_glass(
    cohort: tuple[Path, CohortSummary],
) -> None:
    out, summary = cohort
    checked = 0
    for c in summary.centers:
        folder = out / c.folder
        cells = pq.read_table(folder / "ground_truth" / "cells.parquet").to_pylist()
        for cell in (x for x in cells if x["is_abnormal"]):
            path = next((folder / "slides").glob(f"{cell['slide_id']}.*"))
            with openslide.OpenSlide(path) as s:
                w, h = cell["x1"] - cell["x0"], cell["y1"] - cell["y0"]
                box = np.asarray(s.read_region((cell["x0"], cell["y0"]), 0, (w, h)))
                glass = np.asarray(s.read_region((0, 0), 0, (64, 64)))  # empty corner
            grey = box[..., :3].mean(axis=2)
            background = np.median(glass[..., :3].mean(axis=2))
            assert background > 200
            # nuclear optical density far above the glass (at least OD 0.5 darker)
            assert np.percentile(grey, 1) < background * np.exp(-0.5)
            checked += 1
    assert checked >= 3


def test_same_seed_gives_identical_bytes_whatever_the_workers_or_selection(
    cohort: tuple[Path, CohortSummary], tmp_path: Path
) -> None:
    out, _ = cohort
    again = generate_cohort(
        tmp_path, center_names=["int-b"], slides_per_center=2, size="tiny", seed=0, workers=1
    )
    assert again.slides == 2
    assert _tree(tmp_path / "int-b") == _tree(out / "int-b")


def test_different_seed_gives_different_slides(
    cohort: tuple[Path, CohortSummary], tmp_path: Path
) -> None:
    out, _ = cohort
    generate_cohort(
        tmp_path, centers=1, slides_per_center=2, size="tiny", seed=1, workers=1, progress=False
    )
    first = _tree(out / "int-a")
    other = _tree(tmp_path / "int-a")
    assert first.keys() == other.keys()
    assert all(first[k] != other[k] for k in first if k.startswith("slides/"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"centers": 99}, "centers must be between"),
        ({"center_names": ["nowhere"]}, "unknown center"),
        ({"centers": 1, "center_names": ["int-a"]}, "not both"),
        ({"centers": 1, "slides_per_center": 0}, "at least 1"),
        ({"centers": 1, "size": "huge"}, "unknown size"),
        ({"centers": 1, "abnormal_density_scale": 0.0}, "abnormal density scale must be positive"),
    ],
)
def test_bad_arguments_are_one_line_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"slides_per_center": 1, "size": "tiny", "seed": 0, "progress": False, **kwargs}
    with pytest.raises(CCSError, match=message):
        generate_cohort(tmp_path, **args)


def test_abnormal_density_scale_multiplies_abnormal_cells_and_leaves_the_rest(
    tmp_path: Path,
) -> None:
    profile = load_profiles(None)[0]
    dense = profile.with_abnormal_density_scaled(10.0)
    assert dense.abnormal_density_per_mm2 == (30.0, 150.0)
    assert dense.model_dump(exclude={"abnormal_density_per_mm2"}) == profile.model_dump(
        exclude={"abnormal_density_per_mm2"}
    )
    counts = {}
    for name, p in (("plain", profile), ("dense", dense)):
        classes = make_specimen(np.random.default_rng(3), 900.0, 900.0, p, "LSIL").classes()
        counts[name] = {
            "abnormal": sum(c in ABNORMAL_CLASSES for c in classes),
            "normal": [c for c in classes if c not in ABNORMAL_CLASSES],
        }
    # the normal background is drawn first, from the same stream: identical cells
    assert counts["dense"]["normal"] == counts["plain"]["normal"]
    assert counts["dense"]["abnormal"] >= 5 * counts["plain"]["abnormal"] > 0
    generate_cohort(
        tmp_path, center_names=["int-a"], slides_per_center=1, size="tiny", seed=0,
        workers=1, progress=False, abnormal_density_scale=10.0,
    )  # fmt: skip
    recorded = json.loads((tmp_path / "cohort.json").read_text())["centers"][0]
    assert recorded["abnormal_density_per_mm2"] == [30.0, 150.0]


def test_one_specimen_scanned_at_two_mpps_gives_the_same_physical_grid(tmp_path: Path) -> None:
    profile = load_profiles(None)[0]
    spec = make_specimen(np.random.default_rng(7), 300.0, 300.0, profile, "LSIL")
    render_slide(spec, profile, tmp_path / "fine.svs", mpp=0.25, fmt="svs")
    render_slide(spec, profile, tmp_path / "coarse.tiff", mpp=0.5, fmt="tiff")
    with (
        openslide.OpenSlide(tmp_path / "fine.svs") as fine,
        openslide.OpenSlide(tmp_path / "coarse.tiff") as coarse,
    ):
        assert fine.properties["openslide.vendor"] == "aperio"
        assert coarse.properties["openslide.vendor"] == "generic-tiff"
        assert fine.dimensions == (1200, 1200) and coarse.dimensions == (600, 600)
        a = np.asarray(fine.read_region((0, 0), 0, fine.dimensions))[..., :3].astype(float)
        b = np.asarray(coarse.read_region((0, 0), 0, coarse.dimensions))[..., :3].astype(float)
    down = a.reshape(600, 2, 600, 2, 3).mean(axis=(1, 3))
    assert np.abs(down - b).mean() < 3.0
    assert np.corrcoef(down.mean(axis=2).ravel(), b.mean(axis=2).ravel())[0, 1] > 0.97
