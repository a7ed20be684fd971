"""The Smart-CCS release's four files at toy size, in the published formats: a DINOv2 teacher
checkpoint with chunked blocks, ``MeanMIL.pth``, ``proto_bank.pth`` and a Deformable-DETR
checkpoint in the reference's key layout, all with random weights (built by the import tests'
own builders), plus the two JSON files that say their toy sizes."""

from __future__ import annotations

from pathlib import Path

import torch

from smartccs.models.cells import CropGeometry
from smartccs.models.detr_keys import to_reference
from tests.test_detr_import import TINY as TINY_DETR
from tests.test_detr_import import random_network
from tests.test_models_import import (
    DIM,
    bank_file,
    meanmil_file,
    source_network,
    teacher_chunked,
    tiny_kind,
)

TOY_CROP = CropGeometry(resize_px=61, crop_px=56, top_k=4, max_cells=24)
"""The reference's cut scaled to the toy encoder's 56 px input; 4 cells per class."""


def write_release(folder: Path) -> dict[str, Path]:
    """The files ``ccs models import`` is given, by flag."""
    folder.mkdir(parents=True, exist_ok=True)
    encoder = folder / "CCS_tiny.pth"
    torch.save(teacher_chunked(source_network().state_dict()), encoder)
    kind = folder / "tiny-kind.json"
    kind.write_text(tiny_kind().model_copy(update={"crop": TOY_CROP}).model_dump_json())
    detector = folder / "det_cell.pth"
    torch.save(to_reference(random_network().state_dict()), detector)
    shape = folder / "tiny-detr.json"
    shape.write_text(TINY_DETR.model_dump_json())
    mil, _ = meanmil_file(folder, dropout=True)
    bank, _ = bank_file(folder)
    return {
        "--encoder": encoder,
        "--encoder-kind": kind,
        "--mil": mil,
        "--prototypes": bank,
        "--detector": detector,
        "--detector-shape": shape,
    }


__all__ = ["DIM", "TOY_CROP", "write_release"]
