"""How a classifier's cells are chosen and cut: part of its card, so fixed per classifier.

Two ways to cut a detected cell into an encoder input. The platform's own classifiers take a
square of fixed physical size (``crop_um``) around the box centre, so a cell's size stays a
feature. The Smart-CCS reference (Cls-WSI/lib/datasets.py) cuts the box itself, pads it with
black to a square, resizes to 244 px and centre-crops 224 px (``CropGeometry``); its imported
encoder and MeanMIL head were trained on crops cut that way, so a classifier composed of them
cuts its cells the same way (smartccs.models.compose).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class CropGeometry(BaseModel):
    """The reference's cut of a detected cell: its box clamped to the tile, padded with black
    to a square (box centred), resized to ``resize_px`` and centre-cropped to ``crop_px``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tile_px: int = Field(default=1200, description="tiles the reference's boxes are given in")
    pad: Literal["black-square"] = "black-square"
    resize_px: int = Field(default=244, ge=1, description="side after padding to a square")
    crop_px: int = Field(default=224, ge=1, description="centre crop fed to the encoder")
    top_k: int = Field(default=100, ge=1, description="highest-scoring cells per abnormal class")
    classes: tuple[int, ...] = Field(default=(1, 2, 3, 4, 5, 6), description="detector labels")
    max_cells: int = Field(default=600, ge=1, description="top_k times the number of classes")


class CellConfig(BaseModel):
    """Which cells of a tile are kept and how they are cut."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    crop_um: float = Field(
        default=56.0, gt=0, description="crop side in µm (the reference: 224 px at 0.25 µm/px)"
    )
    cells_per_tile: int = Field(default=8, ge=1, description="abnormal detections kept per tile")
    squamous_score: float = Field(
        default=0.5,
        gt=0,
        lt=1,
        description="unused: adequacy counts nuclei from the pixels (screening.adequacy), as "
        "detector scores are not calibrated; kept so that classifier cards carrying it load",
    )
    crop: CropGeometry | None = Field(
        default=None,
        description="cut each cell by its box the reference's way (crop_um is then unused)",
    )
