"""Whole-slide images: open with a known pixel size, find the cells, tile at a fixed µm scale.

``reader`` (OpenSlide, mpp, one-line errors), ``cache`` (local copies of S3 slides),
``foreground`` (where the cells are), ``specimen`` (is it cytology at all), ``tiling`` (the µm
grid and the read hot path), ``qc`` (per-tile quality) and ``inspect`` (``ccs inspect``).
"""

from smartccs.slide.cache import SlideCache
from smartccs.slide.foreground import ForegroundConfig, ForegroundMask, foreground_mask
from smartccs.slide.inspect import SlideReport, format_report, inspect_slide
from smartccs.slide.qc import TileQC, tile_qc
from smartccs.slide.reader import Slide, SlideInfo, open_slide
from smartccs.slide.specimen import Specimen, assess_specimen
from smartccs.slide.tiling import TilePlan, TileSpec, TilingConfig, plan_tiles, read_tile

__all__ = [
    "ForegroundConfig",
    "ForegroundMask",
    "Slide",
    "SlideCache",
    "SlideInfo",
    "SlideReport",
    "Specimen",
    "TilePlan",
    "TileQC",
    "TileSpec",
    "TilingConfig",
    "assess_specimen",
    "foreground_mask",
    "format_report",
    "inspect_slide",
    "open_slide",
    "plan_tiles",
    "read_tile",
    "tile_qc",
]
