"""Cutting detected cells out of a tile: the encoder's inputs.

Two cuts, as a classifier's card says (smartccs.models.cells): a square of fixed physical size
around the box centre (the platform's classifiers), or the Smart-CCS reference's cut of the box
itself, padded with black to a square, resized and centre-cropped (classifiers composed of the
reference's released encoder and MeanMIL head, which never saw any other cut).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smartccs.models.cells import CropGeometry


def crop_cells(
    tile: torch.Tensor, centers: torch.Tensor, crop_px: int, out_px: int
) -> torch.Tensor:
    """Square crops (N, 3, out_px, out_px) around (N, 2) centres of a [0, 1] tile (3, S, S).

    Beyond the tile's edge the crop repeats the edge pixels, which on a cytology tile is
    mostly glass.
    """
    half = crop_px // 2
    padded = F.pad(tile.unsqueeze(0), (half, half, half, half), mode="replicate").squeeze(0)
    crops = []
    for cx, cy in centers.round().long().tolist():
        x0, y0 = cx, cy  # + half (padding) - half (corner)
        crops.append(padded[:, y0 : y0 + crop_px, x0 : x0 + crop_px])
    if not crops:
        return torch.zeros(0, 3, out_px, out_px)
    batch = torch.stack(crops)
    if crop_px != out_px:
        batch = F.interpolate(batch, size=(out_px, out_px), mode="bilinear", antialias=True)
    return batch


def crop_boxes(
    tile: torch.Tensor, boxes: torch.Tensor, geometry: CropGeometry, out_px: int | None = None
) -> torch.Tensor:
    """The reference's crops (N, 3, out_px, out_px) of (N, 4) xyxy boxes in tile pixels
    (``out_px``: the encoder's input, when it is not the geometry's ``crop_px``).

    As Cls-WSI/lib/datasets.py does with PIL: the box's corner is moved inside the tile and its
    size cut at the far edge, the pixels between the rounded corners are pasted centred on a
    black square of side max(w, h), which is resized (bilinear, antialiased, as torchvision's
    ``Resize`` on a tensor) and centre-cropped. A cell's size is thus lost, as in the reference.
    """
    side_h, side_w = tile.shape[-2:]
    out = torch.zeros(len(boxes), 3, geometry.crop_px, geometry.crop_px)
    lo = round((geometry.resize_px - geometry.crop_px) / 2.0)  # torchvision's CenterCrop
    for n, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        x, y = max(0.0, x0), max(0.0, y0)
        w, h = min(side_w - x, x1 - x0), min(side_h - y, y1 - y0)
        edge = max(1, int(w), int(h))
        square = torch.zeros(3, edge, edge)
        cut = tile[:, round(y) : round(y + h), round(x) : round(x + w)]
        top, left = (edge - int(h)) // 2, (edge - int(w)) // 2
        cut = cut[:, : edge - top, : edge - left]  # PIL's paste clips at the square's edge
        square[:, top : top + cut.shape[1], left : left + cut.shape[2]] = cut
        resized = F.interpolate(
            square.unsqueeze(0),
            size=(geometry.resize_px, geometry.resize_px),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )[0]
        out[n] = resized[:, lo : lo + geometry.crop_px, lo : lo + geometry.crop_px]
    if out_px is not None and out_px != geometry.crop_px:
        out = F.interpolate(out, size=(out_px, out_px), mode="bilinear", antialias=True)
    return out


def dihedral(crops: torch.Tensor, seed: int) -> torch.Tensor:
    """Each crop flipped or not and turned by a multiple of 90°, reproducibly per ``seed``:
    a cell has no up, so these views must embed alike."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c, t in zip(crops, torch.randint(1, 8, (len(crops),), generator=g).tolist(), strict=True):
        c = torch.flip(c, dims=(-1,)) if t >= 4 else c  # never the identity: 7 of the 8
        out.append(torch.rot90(c, t % 4, dims=(-2, -1)))
    return torch.stack(out)
