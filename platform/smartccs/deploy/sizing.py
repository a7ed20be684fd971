"""How big a cluster a screening workload needs, computed from the figures measured in bench/.

Inputs are the JSON files the benchmarks write (bench/screening.py: model forward alone, read
alone and end to end on the same tiles; bench/tile_stream.py: Ray Data reader actors against
raw reads) plus a GPU figure when one has been measured. Nothing here is a guess dressed as a
measurement: every derived number says which measured figure it comes from, and the two
assumptions (read cost grows with a tile's pixel count; slides are their specimen area tiled
completely) are printed with it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from smartccs.errors import CCSError

SECONDS_PER_DAY = 86_400


class SizingError(CCSError):
    """A benchmark file or workload that sizing cannot use."""


@dataclass(frozen=True)
class NodeType:
    name: str
    gpus: int
    vcpus: int
    memory_gib: int
    gpu: str = ""


NODE_TYPES = {
    n.name: n
    for n in (
        NodeType("g5.12xlarge", 4, 48, 192, "A10G 24 GB"),
        NodeType("g5.48xlarge", 8, 192, 768, "A10G 24 GB"),
        NodeType("p4d.24xlarge", 8, 96, 1152, "A100 40 GB"),
        NodeType("m6i.4xlarge", 0, 16, 64),
        NodeType("m6i.8xlarge", 0, 32, 128),
        NodeType("m6i.2xlarge", 0, 8, 32),
    )
}
CPU_NODE = NODE_TYPES["m6i.8xlarge"]


@dataclass(frozen=True)
class Tiling:
    tile_px: int
    target_mpp: float

    @property
    def tile_um(self) -> float:
        return self.tile_px * self.target_mpp


@dataclass(frozen=True)
class Measured:
    """The figures of one bench/screening.py run (and optionally bench/tile_stream.py)."""

    source: str
    device: str
    cpus: int
    models: str
    tiling: Tiling
    forward_tiles_per_s: float
    """Model forward alone, one process: one thread on CPU (one core), or the GPU."""
    e2e_tiles_per_s: float
    """End to end, fused mode, on the whole bench machine (``cpus`` cores, or the GPU)."""
    pipeline_ratio: float
    """End to end over what its scorers reach alone side by side, in the same run (older
    results: over the slowest stage alone, at most 1)."""
    read_tiles_per_cpu_s: float
    reader_ratio: float | None = None
    reader_source: str | None = None

    @property
    def gpu(self) -> bool:
        return self.device != "no GPU"

    @property
    def read_mpx_per_cpu_s(self) -> float:
        return self.read_tiles_per_cpu_s * self.tiling.tile_px**2 / 1e6


def _pipeline_ratio(doc: dict[str, Any], source: str) -> float:
    """What share of its scorers' own rate the engine delivers end to end. Against the slowest
    stage alone (one process) a run on several scorers can exceed 1, which as a multiplier
    would promise a GPU more than it scores; results since issue 31 measure the scorers
    side by side, and older ones are capped at 1."""
    ratios = doc.get("ratios", {})
    if "e2e_fused_vs_forward_side_by_side" in ratios:
        return float(ratios["e2e_fused_vs_forward_side_by_side"])
    return min(1.0, float(_get(doc, "ratios.e2e_fused_vs_slowest_stage", source)))


def _get(doc: dict[str, Any], path: str, source: str) -> Any:
    node: Any = doc
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise SizingError(f"{source}: no {path} (not a bench/screening.py result?)")
        node = node[part]
    return node


def load_measured(screening: str | Path, stream: str | Path | None = None) -> Measured:
    """The figures of a bench/screening.py JSON, and of a bench/tile_stream.py JSON if given
    and present (it only refines the split mode's reader CPUs)."""
    path = Path(screening)
    if not path.is_file():
        raise SizingError(
            f"{path}: no such benchmark result; measure it first "
            "(python bench/screening.py --side-px 12000 --tag cpu2-12k, docs/benchmarks.md)"
        )
    doc = json.loads(path.read_text())
    src = str(path)
    device = str(_get(doc, "settings.device", src))
    gpu = device != "no GPU"
    forward = "forward" if gpu else "forward_1thread"
    measured = Measured(
        source=src,
        device=device,
        cpus=int(_get(doc, "settings.cpus", src)),
        models=str(_get(doc, "settings.models.source", src)),
        tiling=Tiling(
            int(_get(doc, "settings.tile_px", src)), float(_get(doc, "settings.target_mpp", src))
        ),
        forward_tiles_per_s=float(_get(doc, f"median.{forward}.tiles_per_s", src)),
        e2e_tiles_per_s=float(_get(doc, "median.e2e_fused.tiles_per_s", src)),
        pipeline_ratio=_pipeline_ratio(doc, src),
        read_tiles_per_cpu_s=float(_get(doc, "median.read.tiles_per_cpu_s", src)),
    )
    if stream is not None and Path(stream).is_file():
        sdoc = json.loads(Path(stream).read_text())
        ratio = float(_get(sdoc, "reader_per_core_ratio", str(stream)))
        measured = Measured(**{**measured.__dict__, "reader_ratio": ratio,
                               "reader_source": str(stream)})  # fmt: skip
    return measured


def production_tiling(config: str | Path) -> tuple[Tiling, float]:
    """The tiling and the CPUs per scorer of a screening job config (screen-prod.yaml)."""
    from smartccs.engine.job import ScreenJobConfig

    cfg = ScreenJobConfig.model_validate(yaml.safe_load(Path(config).read_text()) or {})
    t = cfg.screening.stream.tiling
    return Tiling(t.tile_px, t.target_mpp), cfg.screening.scorers.cpus


@dataclass(frozen=True)
class Workload:
    slides: int
    days: float
    centers: int
    specimen_mm2: float = 314.16
    """A ThinPrep specimen is a 20 mm circle; SurePath 13 mm (133 mm²)."""
    foreground: float = 1.0
    slide_gb: float = 1.0

    @property
    def slides_per_day(self) -> float:
        return self.slides / self.days

    def tiles_per_slide(self, tiling: Tiling) -> float:
        tile_mm2 = (tiling.tile_um / 1000) ** 2
        return self.specimen_mm2 * self.foreground / tile_mm2


@dataclass(frozen=True)
class Sizing:
    unit: str
    """What one scorer is: "GPU" or "CPU core"."""
    unit_source: str
    tiling: Tiling
    tiles_per_slide: float
    unit_tiles_per_s: float
    """End to end, per unit, as the pipeline runs (pipeline ratio included)."""
    slides_per_day_per_unit: float
    busy: float
    units: int
    read_tiles_per_cpu_s: float
    """At this tiling, scaled from the measured read by pixel count."""
    reader_cpus_per_unit: float
    """Split mode: Ray Data reader actors' CPUs that keep one unit fed."""
    node: NodeType
    nodes: int
    cpu_nodes: int
    """Extra CPU nodes for readers the GPU nodes cannot hold (0 on CPU sizing)."""
    store_mb_per_s: float
    reader_tiles_per_cpu_s: float
    """A Ray Data reader actor's rate: the read scaled by the measured actor overhead."""
    gpu_factor: float | None = None
    """Without a GPU figure: slides/day per GPU per tile/s it scores at the production tiling."""
    production: Tiling | None = None


def _slides_per_day(tiles_per_s: float, workload: Workload, tiling: Tiling) -> float:
    """Slides one unit screens a day at ``tiles_per_s`` end to end, tiles counted at ``tiling``.

    The one formula behind both per-unit figures of a sizing: the sized unit's slides/day and,
    without a GPU figure, the GPU factor (a GPU at 1 tile/s through the measured pipeline
    ratio). Kept in one place so that the factor times a GPU's tiles/s stays exactly what
    sizing with ``--gpu-tiles-per-s`` computes per GPU."""
    return tiles_per_s * SECONDS_PER_DAY / workload.tiles_per_slide(tiling)


def size_cluster(
    measured: Measured,
    workload: Workload,
    node: NodeType,
    gpu_tiles_per_s: float | None = None,
    *,
    production: Tiling | None = None,
    scorer_cpus: float = 4.0,
    busy: float = 0.7,
) -> Sizing:
    """Units (GPUs, or CPU cores without a GPU figure), nodes and reader CPUs for ``workload``.

    The scorer figure decides the tiling: ``gpu_tiles_per_s`` is taken as measured with the
    production models on the production tiling (``production``); a figure from the bench JSON
    is at the bench's own tiling, so the tiles per slide are counted at that tiling."""
    if not 0 < busy <= 1:
        raise SizingError(f"busy must be in (0, 1], got {busy}")
    if workload.slides <= 0 or workload.days <= 0 or workload.centers <= 0:
        raise SizingError("slides, days and centers must be positive")
    if gpu_tiles_per_s is not None:
        if gpu_tiles_per_s <= 0:
            raise SizingError("--gpu-tiles-per-s must be positive")
        unit, tiling = "GPU", production or measured.tiling
        unit_tps = gpu_tiles_per_s * measured.pipeline_ratio
        source = (
            f"given: {gpu_tiles_per_s:g} tiles/s per GPU x {measured.pipeline_ratio:.3f} "
            f"end-to-end ratio ({measured.source})"
        )
    elif measured.gpu:
        unit, tiling = "GPU", measured.tiling
        unit_tps = measured.e2e_tiles_per_s
        source = f"measured end to end on {measured.device} ({measured.source})"
    else:
        unit, tiling = "CPU core", measured.tiling
        unit_tps = measured.e2e_tiles_per_s / measured.cpus
        source = (
            f"measured end to end on {measured.cpus} CPUs, "
            f"{measured.e2e_tiles_per_s:.1f} tiles/s ({measured.source})"
        )
    tiles = workload.tiles_per_slide(tiling)
    per_unit = _slides_per_day(unit_tps, workload, tiling)
    units = math.ceil(workload.slides_per_day / (per_unit * busy))
    scale = (measured.tiling.tile_px / tiling.tile_px) ** 2
    read_tps = measured.read_tiles_per_cpu_s * scale
    reader_tps = read_tps * (measured.reader_ratio or 1.0)
    readers_per_unit = unit_tps / reader_tps if unit == "GPU" else 0.0
    if unit == "GPU":
        if node.gpus == 0:
            raise SizingError(f"{node.name} has no GPU")
        nodes = math.ceil(units / node.gpus)
        spare = node.vcpus - node.gpus * scorer_cpus
        need = units * readers_per_unit - nodes * max(spare, 0)
        cpu_nodes = max(0, math.ceil(need / CPU_NODE.vcpus))
    else:
        node = CPU_NODE
        nodes, cpu_nodes = math.ceil(units / node.vcpus), 0
    store = workload.slides_per_day * workload.slide_gb * 1000 / SECONDS_PER_DAY
    gpu_factor = None
    if unit != "GPU" and production is not None:
        gpu_factor = _slides_per_day(measured.pipeline_ratio, workload, production)
    return Sizing(
        unit=unit,
        unit_source=source,
        tiling=tiling,
        tiles_per_slide=tiles,
        unit_tiles_per_s=unit_tps,
        slides_per_day_per_unit=per_unit,
        busy=busy,
        units=units,
        read_tiles_per_cpu_s=read_tps,
        reader_cpus_per_unit=readers_per_unit,
        node=node,
        nodes=nodes,
        cpu_nodes=cpu_nodes,
        store_mb_per_s=store,
        reader_tiles_per_cpu_s=reader_tps,
        gpu_factor=gpu_factor,
        production=production,
    )


def format_report(m: Measured, w: Workload, s: Sizing) -> str:
    """The sizing as the lines docs/deploy.md prints."""
    if m.gpu:
        gpu_note = f"device {m.device}"
    elif s.unit == "GPU":
        gpu_note = "no GPU in this run (CPU figures); the GPU figure is the one given"
    else:
        gpu_note = "no GPU (CPU figures only; pass --gpu-tiles-per-s once one is measured)"
    lines = [
        f"measured   {m.source}: {gpu_note}",
        f"           models: {m.models}",
        f"           model forward alone: {m.forward_tiles_per_s:.1f} tiles/s"
        + ("" if m.gpu else " per CPU core (1 thread)")
        + f"; end to end fused: {m.e2e_tiles_per_s:.1f} tiles/s on {m.cpus} CPUs, "
        f"{m.pipeline_ratio:.3f} of its scorers' own rate",
        f"           read_tile alone: {m.read_tiles_per_cpu_s:.0f} tiles/CPU-s at "
        f"{m.tiling.tile_px} px = {m.read_mpx_per_cpu_s:.1f} Mpx/CPU-s",
    ]
    if m.reader_ratio is not None:
        lines.append(
            f"           Ray Data reader actors: {m.reader_ratio:.3f} of raw per CPU-s "
            f"({m.reader_source})"
        )
    per_center = w.slides_per_day / w.centers
    lines += [
        f"workload   {w.slides:,} slides in {w.days:g} day{'s' if w.days != 1 else ''} = "
        f"{w.slides_per_day:,.0f} slides/day; "
        f"{w.centers} centers, {per_center:,.0f} slides/center/day",
        f"           {w.specimen_mm2:g} mm² specimen x {w.foreground:g} kept, tiles of "
        f"{s.tiling.tile_um:g} µm ({s.tiling.tile_px} px at {s.tiling.target_mpp:g} µm/px): "
        f"{s.tiles_per_slide:,.0f} tiles/slide",
        f"per {s.unit}: {s.unit_tiles_per_s:.1f} tiles/s end to end -> "
        f"{s.slides_per_day_per_unit:,.1f} slides/day",
        f"           ({s.unit_source})",
    ]
    if s.unit == "GPU":
        lines.append(
            f"           reader CPUs per GPU (split mode): {s.reader_cpus_per_unit:.1f}, a reader "
            f"actor at {s.reader_tiles_per_cpu_s:.0f} tiles/CPU-s ({s.read_tiles_per_cpu_s:.0f} "
            "raw: the measured read scaled by pixel count)"
        )
    elif s.gpu_factor is not None and s.production is not None:
        lines.append(
            f"per GPU: not measured; slides/day per GPU = {s.gpu_factor:.2f} x its tiles/s at the "
            f"production tiling (86,400 s x {m.pipeline_ratio:.3f} / "
            f"{w.tiles_per_slide(s.production):,.0f} tiles per slide at {s.production.tile_px} px)"
        )
    lines.append(
        f"cluster    {s.units} {s.unit}s at {s.busy:.0%} busy -> {s.nodes} x {s.node.name}"
        + (f" ({s.node.gpus} x {s.node.gpu})" if s.node.gpus else f" ({s.node.vcpus} vCPU)")
        + (f" + {s.cpu_nodes} x {CPU_NODE.name} for readers" if s.cpu_nodes else "")
    )
    lines.append(
        f"store      {s.store_mb_per_s:,.0f} MB/s average read of slides "
        f"({w.slide_gb:g} GB/slide, {w.slides_per_day * w.slide_gb / 1000:,.1f} TB/day)"
    )
    if not m.gpu and s.unit != "GPU":
        lines.append(
            "note       CPU cores running the bench's demo-size models (ViT-tiny): production "
            "models cost far more per tile, so this undercounts a CPU-only cluster; it is not a "
            "production figure"
        )
    return "\n".join(lines)
