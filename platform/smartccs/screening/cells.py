"""Detect and embed cells where the tile pixels are: the screening engine's per-tile stage.

A ``CellScorer`` actor reads a batch of planned tiles itself (or takes tiles already read, when
reading runs on its own actors), runs the detector on them, keeps each tile's best abnormal
detections, cuts each from the tile it already holds (a fixed-size square in µm, or the
reference's cut of the box, as the classifier's card says: ``screening.crops``), and embeds the
crops with the frozen encoder the classifier names. Only detections and embeddings leave the
actor, never pixels, so nothing downstream needs to reopen a slide. Every tile also yields one
summary row (``class_index = TILE_ROW``: its squamous nuclei, counted from the pixels for
adequacy by ``screening.adequacy``, or its error), so a slide whose tiles all failed still
reaches the results.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from smartccs.data.tiles import STATUS_OK, StreamConfig, TileReader
from smartccs.faults import fault_point
from smartccs.models.artifacts import ModelCard, load_model
from smartccs.models.cells import CellConfig as CellConfig  # the card contract, re-exported
from smartccs.models.detector import normalize
from smartccs.models.loaders import cell_encoder
from smartccs.models.refs import ModelRef, encoder_ref
from smartccs.screening.cell_rows import (
    AUG_EMBEDDING,
    BOX,
    CLASS_INDEX,
    EMBEDDING,
    ERROR,
    N_SQUAMOUS,
    QC_COLUMNS,
    ROW_COLUMNS,
    SCORE,
    SECONDS,
    SLIDE_COLUMNS,
    STATUS,
    TILE_INDEX,
    TILE_ROW,
)  # fmt: skip
from smartccs.screening.crops import crop_boxes, crop_cells, dihedral
from smartccs.screening.detection import Found, TileDetector, autocast
from smartccs.screening.squamous import count_squamous
from smartccs.stain import StainCalibration, calibrate
from smartccs.store import Store, StoreConfig

log = logging.getLogger(__name__)


def on_detector_grid(stream: StreamConfig, detector: ModelCard) -> StreamConfig:
    """``stream`` with the tiling the detector was trained on, whatever it said before: a
    detector sees cells at the scale it learned them or not at all."""
    if stream.tiling == detector.tiling:
        return stream
    log.info("tiling from detector %s/%s: %s", detector.name, detector.version, detector.tiling)
    return stream.model_copy(update={"tiling": detector.tiling})


class CellScorer:
    """Ray Data actor: tiles in, cell rows (detection + embedding) and tile rows out."""

    def __init__(
        self,
        store_config: StoreConfig,
        detector: ModelRef,
        cells: CellConfig,
        threads: int = 1,
        device: str | None = None,
        stream: StreamConfig | None = None,
        views: int = 1,
        norms: dict[str, np.ndarray] | None = None,
        stain: StainCalibration | None = None,
        encoder: ModelRef | None = None,
    ):
        torch.set_num_threads(max(1, threads))
        self.stain = stain  # a center's stain calibration (adaptation), applied on every tile
        store = Store(store_config)
        self.reader = TileReader(store_config, stream) if stream is not None else None
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.detector = TileDetector(store, detector, self.device, norms)  # norms: tent's
        self.card = self.detector.card
        self.views = views
        enc = encoder or encoder_ref(self.card)  # a classifier names it; else the detector's
        self.encoder_card, enc_state = load_model(store, enc.name, enc.version)
        self.encoder, self.embed_px, self.dim = cell_encoder(self.encoder_card, enc_state)
        self.encoder.eval().to(self.device)
        self.cells = cells
        self.crop_px = max(8, round(cells.crop_um / self.card.tiling.target_mpp))

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        if self.reader is not None:  # planned rows in: the pixels never leave this process
            batch = self.reader(batch)
        ok = np.flatnonzero(batch[STATUS] == STATUS_OK)
        tiling = self.card.tiling  # the count sees the tiles as read, before any calibration
        n_squamous = count_squamous(
            batch["image"][ok], tiling.target_mpp, overlap_px=tiling.overlap_px, device=self.device
        )
        squamous = dict(zip(ok.tolist(), n_squamous.tolist(), strict=True))
        if self.stain is not None:  # before detection and crops alike: the whole model sees it
            batch = batch | {"image": calibrate(batch["image"], self.stain)}
        kept, crops = self._keep_and_crop(batch, self._detect(batch, ok))
        # every crop of the call through the encoder at once, not tile by tile
        emb = self._embed(torch.cat(crops)) if crops else np.zeros((0, self.dim), np.float32)
        return self._rows(batch, kept, emb, squamous, t0)

    def _detect(self, batch: dict[str, np.ndarray], ok: np.ndarray) -> dict[int, Found]:
        """The detector's abnormal cells for each readable tile, by its index in the batch."""
        found = self.detector(batch["image"][ok])
        if len(ok):
            fault_point("cells.detect")
        return dict(zip(ok.tolist(), found, strict=True))

    def _keep_and_crop(
        self, batch: dict[str, np.ndarray], by_tile: dict[int, Found]
    ) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor, np.ndarray]], list[torch.Tensor]]:
        """Each tile's best abnormal cells (classes, scores, level-0 boxes) and their crops
        (with ``views=2`` the augmented view after them)."""
        kept: dict[int, tuple[torch.Tensor, torch.Tensor, np.ndarray]] = {}
        crops: list[torch.Tensor] = []
        for i, found in by_tile.items():
            n = min(len(found.scores), self.cells.cells_per_tile)
            if not n:
                continue
            boxes = found.boxes[:n]  # tile pixels at the detector's tiling
            # split mode's tiles come read-only from Arrow: torch wants its own copy of those
            pixels = np.require(batch["image"][i], requirements="W")
            tile = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
            if self.cells.crop is not None:  # the reference's cut of the box itself
                crop = crop_boxes(tile, boxes, self.cells.crop, self.embed_px)
            else:
                centres = (boxes[:, :2] + boxes[:, 2:]) / 2
                crop = crop_cells(tile, centres, self.crop_px, self.embed_px)
            if self.views > 1:  # the augmented view, seeded by the tile: a re-run sees the same
                crop = torch.cat([crop, dihedral(crop, int(batch[TILE_INDEX][i]))])
            crops.append(crop)
            kept[i] = (found.classes[:n], found.scores[:n], self._level0(batch, i, boxes))
        return kept, crops

    def _rows(
        self,
        batch: dict[str, np.ndarray],
        kept: dict[int, tuple[torch.Tensor, torch.Tensor, np.ndarray]],
        emb: np.ndarray,
        squamous: dict[int, int],
        t0: float,
    ) -> dict[str, np.ndarray]:
        """One row per kept cell, then each tile's summary row, as the output columns."""
        rows: dict[str, list[Any]] = {k: [] for k in ROW_COLUMNS}
        emb_rows: list[np.ndarray] = []
        at = 0
        for i in range(len(batch[TILE_INDEX])):
            base = {k: batch[k][i] for k in (*SLIDE_COLUMNS, TILE_INDEX)}
            if i in kept:
                labels, scores, level0 = kept[i]
                n = len(labels)
                tile_emb = emb[at : at + n]
                if self.views > 1:
                    tile_emb = np.concatenate([tile_emb, emb[at + n : at + 2 * n]], axis=1)
                at += n * self.views
                for j in range(n):
                    _append(
                        rows, base, int(labels[j]), float(scores[j]), level0[j], STATUS_OK, "",
                        0, _NO_QC,
                    )  # fmt: skip
                    emb_rows.append(tile_emb[j])
            qc = tuple(float(batch[k][i]) if k in batch else float("nan") for k in QC_COLUMNS)
            status, error = str(batch[STATUS][i]), str(batch[ERROR][i])
            _append(
                rows, base, TILE_ROW, float("nan"), np.full(4, np.nan), status, error,
                squamous.get(i, 0), qc,
            )  # fmt: skip
            emb_rows.append(np.zeros(self.dim * self.views, np.float32))
        out = {k: np.asarray(v) for k, v in rows.items()}
        tile_rows = out[CLASS_INDEX] == TILE_ROW
        out[SECONDS] = np.where(
            tile_rows, (time.perf_counter() - t0) / max(1, int(tile_rows.sum())), np.nan
        )
        out[BOX] = np.stack(rows[BOX]).astype(np.float64)
        all_emb = np.stack(emb_rows).astype(np.float32)
        out[EMBEDDING] = all_emb[:, : self.dim]
        if self.views > 1:
            out[AUG_EMBEDDING] = all_emb[:, self.dim :]
        return out

    def _embed(self, crops: torch.Tensor, chunk: int = 256) -> np.ndarray:
        """(N, D) embeddings of [0, 1] crops, in chunks that bound the activations' memory."""
        out = []
        for k in range(0, len(crops), chunk):
            x = normalize(crops[k : k + chunk], self.encoder_card.normalization).to(self.device)
            with autocast(self.device):
                out.append(self.encoder(x).float().cpu().numpy())
        return np.concatenate(out)

    def _level0(self, batch: dict[str, np.ndarray], i: int, boxes: torch.Tensor) -> np.ndarray:
        """Boxes in tile pixels -> level-0 slide pixels (the ``cells`` table's frame)."""
        x0, y0, w0, h0 = (float(batch[k][i]) for k in ("x0", "y0", "w0", "h0"))
        tile_px = self.card.tiling.tile_px
        s = np.array([w0 / tile_px, h0 / tile_px] * 2)
        return boxes.numpy().astype(np.float64) * s + np.array([x0, y0, x0, y0])


_NO_QC = (float("nan"),) * len(QC_COLUMNS)


def _append(
    rows: dict[str, list[Any]],
    base: dict[str, Any],
    cls: int,
    score: float,
    box: np.ndarray,
    status: str,
    error: str,
    squamous: int,
    qc: tuple[float, ...],
) -> None:
    for k, v in base.items():
        rows[k].append(v)
    rows[CLASS_INDEX].append(cls)
    rows[SCORE].append(score)
    rows[BOX].append(box)
    rows[STATUS].append(status)
    rows[ERROR].append(error)
    rows[N_SQUAMOUS].append(squamous)
    for k, v in zip(QC_COLUMNS, qc, strict=True):
        rows[k].append(v)
