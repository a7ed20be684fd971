"""Cluster sizing from benchmark figures (smartccs.deploy.sizing, `ccs deploy sizing`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from cli import assert_one_line_error, run_ccs

from smartccs.deploy.sizing import (
    NODE_TYPES,
    SizingError,
    Tiling,
    Workload,
    format_report,
    load_measured,
    production_tiling,
    size_cluster,
)

REPO = Path(__file__).resolve().parents[1]


def _bench(tmp_path: Path, device: str = "no GPU", cpus: int = 2) -> Path:
    """A result with the fields bench/screening.py writes (median runs, ratios, settings)."""
    doc = {
        "settings": {
            "device": device,
            "cpus": cpus,
            "tile_px": 256,
            "target_mpp": 0.5,
            "models": {"source": "random weights, demo sizes"},
        },
        "median": {
            "read": {"tiles_per_s": 640.0, "tiles_per_cpu_s": 600.0},
            "forward": {"tiles_per_s": 40.0},
            "forward_1thread": {"tiles_per_s": 25.0},
            "e2e_fused": {"tiles_per_s": 30.0},
        },
        "ratios": {"e2e_fused_vs_slowest_stage": 0.75},
    }
    path = tmp_path / "screening.json"
    path.write_text(json.dumps(doc))
    return path


def test_cpu_sizing_uses_the_measured_end_to_end_rate_per_core(tmp_path: Path):
    m = load_measured(_bench(tmp_path))
    w = Workload(slides=10_000, days=10, centers=4, specimen_mm2=16.384, foreground=0.5)
    s = size_cluster(m, w, NODE_TYPES["g5.12xlarge"], busy=0.5, production=Tiling(512, 0.5))
    # 16.384 mm² x 0.5 of 128 µm tiles (0.016384 mm²) = 500 tiles per slide
    assert s.tiles_per_slide == pytest.approx(500)
    assert s.unit == "CPU core" and s.unit_tiles_per_s == pytest.approx(15.0)  # 30 on 2 CPUs
    assert s.slides_per_day_per_unit == pytest.approx(15.0 * 86_400 / 500)
    assert s.units == math.ceil(1000 / (2592 * 0.5))
    assert s.node.gpus == 0 and s.nodes == 1
    # what one GPU would do, per tile/s it scores on the production tiling (125 tiles a slide)
    assert s.gpu_factor == pytest.approx(86_400 * 0.75 / 125)
    report = format_report(m, w, s)
    assert "no GPU" in report and "not a production" in report


def test_a_given_gpu_figure_sizes_gpus_nodes_and_reader_cpus(tmp_path: Path):
    stream = tmp_path / "stream.json"
    stream.write_text(json.dumps({"reader_per_core_ratio": 0.5}))
    m = load_measured(_bench(tmp_path), stream)
    assert m.reader_ratio == 0.5
    w = Workload(slides=100_000, days=10, centers=48)
    prod = Tiling(512, 0.5)  # twice the bench's tile side: reads cost 4x per tile
    s = size_cluster(m, w, NODE_TYPES["g5.12xlarge"], 400.0, production=prod, scorer_cpus=4)
    assert s.unit == "GPU" and s.tiling == prod
    assert s.unit_tiles_per_s == pytest.approx(400 * 0.75)
    tiles = 314.16 / (0.256**2)
    assert s.tiles_per_slide == pytest.approx(tiles)
    per_gpu = 300 * 86_400 / tiles
    assert s.slides_per_day_per_unit == pytest.approx(per_gpu)
    assert s.units == math.ceil(10_000 / (per_gpu * 0.7))
    assert s.nodes == math.ceil(s.units / 4)
    assert s.read_tiles_per_cpu_s == pytest.approx(150.0)  # 600 at 256 px, 4x the pixels
    assert s.reader_tiles_per_cpu_s == pytest.approx(75.0)  # reader actors at 0.5 of raw
    assert s.reader_cpus_per_unit == pytest.approx(300 / 75)
    assert s.store_mb_per_s == pytest.approx(10_000 * 1000 / 86_400)
    assert "the GPU figure is the one given" in format_report(m, w, s)
    # readers that do not fit beside the scorers spill onto CPU nodes
    slow = size_cluster(m, w, NODE_TYPES["g5.12xlarge"], 8000.0, production=prod)
    assert slow.reader_cpus_per_unit == pytest.approx(80) and slow.cpu_nodes > 0


def test_a_gpu_bench_is_a_gpu_figure_and_bad_input_is_refused(tmp_path: Path):
    m = load_measured(_bench(tmp_path, device="NVIDIA H100"))
    assert m.gpu and m.forward_tiles_per_s == 40.0  # the GPU forward, not the 1-thread CPU one
    s = size_cluster(m, Workload(slides=1000, days=1, centers=1), NODE_TYPES["p4d.24xlarge"])
    assert s.unit == "GPU" and s.unit_tiles_per_s == 30.0 and s.node.gpus == 8
    with pytest.raises(SizingError, match="busy"):
        size_cluster(m, Workload(1, 1, 1), NODE_TYPES["p4d.24xlarge"], busy=0)
    with pytest.raises(SizingError, match="no GPU"):
        size_cluster(m, Workload(1, 1, 1), NODE_TYPES["m6i.8xlarge"], 100.0)
    broken = tmp_path / "other.json"
    broken.write_text(json.dumps({"settings": {"device": "no GPU"}}))
    with pytest.raises(SizingError, match=r"no settings\.cpus"):
        load_measured(broken)


def test_production_tiling_comes_from_the_screening_config():
    tiling, scorer_cpus = production_tiling(REPO / "jobs/configs/screen-prod.yaml")
    assert tiling == Tiling(448, 0.5) and scorer_cpus == 4.0


def test_cli_prints_the_sizing_and_names_a_missing_benchmark(tmp_path: Path):
    bench = _bench(tmp_path)
    res = run_ccs(
        "deploy", "sizing", "--screening-bench", str(bench), "--stream-bench", "",
        "--slides", "96000", "--days", "30", "--gpu-tiles-per-s", "400", cwd=REPO,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "3,200 slides/day" in res.stdout and "48 centers, 67 slides/center/day" in res.stdout
    assert "448 px at 0.5 µm/px" in res.stdout and "g5.12xlarge" in res.stdout
    missing = run_ccs("deploy", "sizing", "--screening-bench", str(tmp_path / "none.json"))
    assert_one_line_error(missing, "none.json", "bench/screening.py")


def test_the_gpu_multiplier_is_end_to_end_over_the_scorers_side_by_side(tmp_path: Path):
    """Against the slowest stage alone a run on two scorers can exceed 1 (1.06 on this
    machine): as a GPU multiplier that would promise more than the GPU scores."""
    path = _bench(tmp_path)
    doc = json.loads(path.read_text())
    doc["ratios"] = {"e2e_fused_vs_slowest_stage": 1.06}
    path.write_text(json.dumps(doc))
    assert load_measured(path).pipeline_ratio == 1.0, "an older result: capped at 1"
    doc["ratios"]["e2e_fused_vs_forward_side_by_side"] = 0.78
    path.write_text(json.dumps(doc))
    assert load_measured(path).pipeline_ratio == 0.78
