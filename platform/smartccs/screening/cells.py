"""Detect and embed cells where the tile pixels are: the screening engine's per-tile stage.

A ``CellScorer`` actor reads a batch of planned tiles itself (or takes tiles already read, when
reading runs on its own actors), runs the detector on them, keeps each tile's best abnormal
detections, cuts a fixed-size crop (in µm) around each from the tile it already holds, and
embeds the crops with the frozen pretrained encoder. Only detections and embeddings leave the
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
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from smartccs.data.tiles import STATUS_OK, StreamConfig, TileReader
from smartccs.faults import fault_point
from smartccs.models.artifacts import ModelCard, load_model
from smartccs.models.detector import build_detector, normalize, preprocess
from smartccs.models.encoder import build_from, input_size
from smartccs.models.norms import apply_norms
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
from smartccs.screening.squamous import count_squamous
from smartccs.stain import StainCalibration, calibrate
from smartccs.store import Store, StoreConfig
from smartccs.taxonomy import ABNORMAL_CLASSES

log = logging.getLogger(__name__)


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


def on_detector_grid(stream: StreamConfig, detector: ModelCard) -> StreamConfig:
    """``stream`` with the tiling the detector was trained on, whatever it said before: a
    detector sees cells at the scale it learned them or not at all."""
    if stream.tiling == detector.tiling:
        return stream
    log.info("tiling from detector %s/%s: %s", detector.name, detector.version, detector.tiling)
    return stream.model_copy(update={"tiling": detector.tiling})


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


def dihedral(crops: torch.Tensor, seed: int) -> torch.Tensor:
    """Each crop flipped or not and turned by a multiple of 90°, reproducibly per ``seed``:
    a cell has no up, so these views must embed alike."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c, t in zip(crops, torch.randint(1, 8, (len(crops),), generator=g).tolist(), strict=True):
        c = torch.flip(c, dims=(-1,)) if t >= 4 else c  # never the identity: 7 of the 8
        out.append(torch.rot90(c, t % 4, dims=(-2, -1)))
    return torch.stack(out)


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
    ):
        torch.set_num_threads(max(1, threads))
        self.stain = stain  # a center's stain calibration (adaptation), applied on every tile
        store = Store(store_config)
        self.reader = TileReader(store_config, stream) if stream is not None else None
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.card, state = load_model(store, detector.name, detector.version)
        self.detector = build_detector(self.card)
        self.detector.load_state_dict(state)
        if norms:  # a center's adapted normalisation layers (tent)
            apply_norms(self.detector, {k: torch.tensor(np.array(v)) for k, v in norms.items()})
        self.detector.eval().to(self.device)
        self.views = views
        enc = encoder_ref(self.card)
        self.encoder_card, enc_state = load_model(store, enc.name, enc.version)
        self.encoder = build_from(self.encoder_card.architecture)
        self.encoder.load_state_dict(enc_state)
        self.encoder.eval().to(self.device)
        self.cells = cells
        self.input_px = int(self.card.head["input_px"])
        self.tile_px = self.card.tiling.tile_px
        self.crop_px = max(8, round(cells.crop_um / self.card.tiling.target_mpp))
        self.embed_px = input_size(self.encoder)
        self.dim = int(self.encoder.num_features)
        self.n_abnormal = len(ABNORMAL_CLASSES)

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

    def _detect(self, batch: dict[str, np.ndarray], ok: np.ndarray) -> dict[int, Any]:
        """The detector's output for each readable tile, by its index in the batch."""
        detections = []
        if len(ok):
            x = preprocess(batch["image"][ok], self.input_px, self.card.normalization)
            with self._autocast():
                detections = self.detector.detect(x.to(self.device))
            fault_point("cells.detect")
        return dict(zip(ok.tolist(), detections, strict=True))

    def _keep_and_crop(
        self, batch: dict[str, np.ndarray], by_tile: dict[int, Any]
    ) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor, np.ndarray]], list[torch.Tensor]]:
        """Each tile's best abnormal cells (labels, scores, level-0 boxes) and their crops
        (with ``views=2`` the augmented view after them)."""
        scale = self.tile_px / self.input_px
        kept: dict[int, tuple[torch.Tensor, torch.Tensor, np.ndarray]] = {}
        crops: list[torch.Tensor] = []
        for i, det in by_tile.items():
            labels, scores = det.labels.cpu(), det.scores.cpu()
            abnormal = torch.nonzero(labels < self.n_abnormal).squeeze(1)
            keep = abnormal[scores[abnormal].argsort(descending=True)]
            keep = keep[: self.cells.cells_per_tile]
            if not len(keep):
                continue
            boxes = det.boxes.cpu()[keep] * scale  # tile pixels at target mpp
            tile = torch.from_numpy(batch["image"][i]).permute(2, 0, 1).float() / 255
            crop = crop_cells(tile, (boxes[:, :2] + boxes[:, 2:]) / 2, self.crop_px, self.embed_px)
            if self.views > 1:  # the augmented view, seeded by the tile: a re-run sees the same
                crop = torch.cat([crop, dihedral(crop, int(batch[TILE_INDEX][i]))])
            crops.append(crop)
            kept[i] = (labels[keep], scores[keep], self._level0(batch, i, boxes))
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
            with self._autocast():
                out.append(self.encoder(x).float().cpu().numpy())
        return np.concatenate(out)

    def _autocast(self):
        """bfloat16 on a GPU (as in training); full precision on CPU, where it is not faster."""
        return torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"
        )

    def _level0(self, batch: dict[str, np.ndarray], i: int, boxes: torch.Tensor) -> np.ndarray:
        """Boxes in tile pixels -> level-0 slide pixels (the ``cells`` table's frame)."""
        x0, y0, w0, h0 = (float(batch[k][i]) for k in ("x0", "y0", "w0", "h0"))
        s = np.array([w0 / self.tile_px, h0 / self.tile_px] * 2)
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
