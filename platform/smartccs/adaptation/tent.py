"""Tent on the detector: entropy minimisation of its normalisation layers on a batch's tiles.

A new center's stain and scanner move the statistics every layer sees; the MIL head only sees
the cells the detector already picked. Tent (Wang et al., ICLR 2021) adapts only the affine
parameters of the normalisation layers, here of the ViT backbone and the detection neck, by
making the detector's class decisions on the tile's most cell-like locations more certain.
Glass locations are left out on purpose: their entropy is lowest for "no cell anywhere".
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from smartccs.adaptation.config import AdaptConfig
from smartccs.adaptation.contrastive import relative_drift
from smartccs.data.tiles import StreamConfig, sample_tiles
from smartccs.models.artifacts import load_model
from smartccs.models.detector import CellDetector, build_detector, preprocess
from smartccs.models.norms import apply_norms, norm_parameters
from smartccs.models.refs import ModelRef
from smartccs.screening.cells import on_detector_grid
from smartccs.stain import StainCalibration, calibrate
from smartccs.store import Store, StoreConfig


def entropy_loss(detector: CellDetector, x: torch.Tensor, locations: int) -> torch.Tensor:
    """Mean class entropy over each tile's ``locations`` most cell-like feature positions."""
    logits, _ = detector(x)
    b, c = logits.shape[:2]
    flat = logits.float().permute(0, 2, 3, 1).reshape(b, -1, c)
    k = min(locations, flat.shape[1])
    top = flat.sigmoid().amax(-1).topk(k, dim=1).indices  # (B, k)
    chosen = torch.gather(flat, 1, top.unsqueeze(-1).expand(-1, -1, c))
    p = torch.softmax(chosen, dim=-1)
    return -(p * torch.log(p.clamp_min(1e-8))).sum(-1).mean()


def tent_adapt(
    detector: CellDetector,
    tiles: np.ndarray,
    input_px: int,
    normalization,
    norms: dict[str, torch.Tensor],
    cfg: AdaptConfig,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Adapted norm parameters (starting from ``norms``, else the detector's own) and stats.

    ``detector`` must hold the source weights: the drift bound is measured from them.

    Past the drift bound the source parameters come back (a reset, reported in the stats).
    """
    t = cfg.tent
    params = norm_parameters(detector)
    source = {k: v.detach().clone() for k, v in params.items()}
    if norms:
        apply_norms(detector, norms)
    for p in detector.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    detector.train()  # LayerNorm/GroupNorm behave alike in train and eval: no batch stats
    opt = torch.optim.Adam(params.values(), lr=t.lr)
    losses = []
    for _ in range(t.steps):
        for i in range(0, len(tiles), t.batch_size):
            x = preprocess(tiles[i : i + t.batch_size], input_px, normalization)
            loss = entropy_loss(detector, x, t.locations)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    detector.eval()
    adapted = {k: v.detach().clone() for k, v in params.items()}
    drift = relative_drift(adapted, source)
    stats = {"tiles": float(len(tiles)), "entropy": float(np.mean(losses)) if losses else 0.0}
    if drift > cfg.max_drift or not all(torch.isfinite(v).all() for v in adapted.values()):
        apply_norms(detector, source)
        return source, stats | {"drift": drift, "reset": 1.0}
    return adapted, stats | {"drift": drift, "reset": 0.0}


def tent_batch(
    store_config: StoreConfig,
    detector_ref: ModelRef,
    rows: list[dict[str, Any]],
    stream: StreamConfig,
    norms: dict[str, torch.Tensor],
    cfg: AdaptConfig,
    stain: StainCalibration | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Tent for one batch of slides: sample its tiles (in the center's calibrated stain),
    adapt from ``norms``; runs anywhere (a Ray task on a scorer's resources in the engine)."""
    card, weights = load_model(Store(store_config), detector_ref.name, detector_ref.version)
    detector = build_detector(card, weights)
    stream = on_detector_grid(stream, card)
    tiles = sample_tiles(store_config, rows, stream, cfg.tent.tiles)
    if stain is not None:
        tiles = calibrate(tiles, stain)
    return tent_adapt(detector, tiles, int(card.head["input_px"]), card.normalization, norms, cfg)
