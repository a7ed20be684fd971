"""The study's cohort: generated once, cut into the batches each arm trains on or screens.

Internal centers give a labelled ``train`` batch (the training jobs carve their own
validation and held-out slides out of it) and held-out test batches; external centers, whose
profiles shift stain, scanner and focus, give test batches only. Test batches hold
``batch_slides`` slides each, because test-time adaptation goes batch by batch. Every batch
is uploaded through the same door a screening center uses, with its cell annotations beside it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from smartccs.batches import BatchRef, is_committed, load_batch
from smartccs.errors import AlreadyCommittedError, CCSError
from smartccs.ids import batch_key
from smartccs.labels import has_cell_labels, put_cell_labels
from smartccs.manifest import MANIFEST_NAME, Manifest
from smartccs.splits import SplitConfig, assign_splits
from smartccs.store import Store
from smartccs.upload import upload_batch

log = logging.getLogger(__name__)

GROUND_TRUTH = Path("ground_truth") / "cells.parquet"


class StudyBatch(BaseModel):
    """One uploaded batch and what the study uses it for."""

    model_config = ConfigDict(frozen=True)

    center: str
    batch: str
    kind: str  # internal | external
    role: str  # train | test
    slides: int

    @property
    def id(self) -> str:
        return batch_key(self.center, self.batch)


def generated_centers(cohort_dir: Path) -> list[Path]:
    """Center folders of a generated cohort (each holds a manifest)."""
    return sorted(p.parent for p in cohort_dir.glob(f"*/{MANIFEST_NAME}"))


def center_kinds(cohort_dir: Path) -> dict[str, str]:
    """Center name -> ``internal`` / ``external``, from the cohort's ``cohort.json``."""
    info = json.loads((cohort_dir / "cohort.json").read_text())
    return {c["name"]: c["kind"] for c in info["centers"]}


def sub_batch(center_dir: Path, slide_ids: list[str], batch: str, out: Path) -> Path:
    """A batch folder of some of a generated center's slides: symlinks, a manifest naming
    only them, and their share of the cell annotations."""
    manifest = Manifest.loads((center_dir / MANIFEST_NAME).read_bytes())
    keep = set(slide_ids)
    slides = [s for s in manifest.slides if s.slide_id in keep]
    if len(slides) != len(keep):
        missing = keep - {s.slide_id for s in slides}
        raise CCSError(f"{center_dir / MANIFEST_NAME} has no slides {sorted(missing)}")
    folder = out / center_dir.name / batch
    if not (folder / MANIFEST_NAME).exists():
        for s in slides:
            link = folder / s.path
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to((center_dir / s.path).resolve())
        truth = center_dir / GROUND_TRUTH
        if truth.is_file():
            cells = pq.read_table(truth)
            cells = cells.filter(
                pc.is_in(cells["slide_id"], value_set=pa.array(sorted(keep), pa.string()))
            )
            (folder / GROUND_TRUTH).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(cells, folder / GROUND_TRUTH)
        part = manifest.model_copy(update={"batch": batch, "slides": slides})
        (folder / MANIFEST_NAME).write_text(part.model_dump_json(indent=2))
    return folder


def ensure_uploaded(store: Store, folder: Path, center: str, batch: str) -> BatchRef:
    """Upload a batch folder once, with its cell annotations; a re-run reuses the batch if
    it holds the same slides and refuses if the id is taken by other ones."""
    local = Manifest.loads((folder / MANIFEST_NAME).read_bytes())
    if is_committed(store, center, batch):
        ref = load_batch(store, center, batch)
        if {s.sha256 for s in ref.manifest.slides} != {s.sha256 for s in local.slides}:
            raise AlreadyCommittedError(
                f"batch {center}/{batch} in {store.uri()} holds other slides than {folder}; "
                "use another store or seed"
            )
    else:
        ref = upload_batch(folder, center=center, batch=batch, store=store, progress=False)
    cells = folder / GROUND_TRUTH
    if cells.is_file() and not has_cell_labels(store, center, batch):
        put_cell_labels(store, ref, cells)
    return ref


def cut_batches(
    cohort_dir: Path, out: Path, tag: str, test_fraction: float, batch_slides: int, seed: int
) -> list[tuple[Path, StudyBatch]]:
    """Each center's slides as the study's batches (folders under ``out``), named ``<tag>-*``.

    Internal slides are split stratified by normal/abnormal (``smartccs.splits``), so both
    kinds land in training and in test.
    """
    kinds = center_kinds(cohort_dir)
    cut: list[tuple[Path, StudyBatch]] = []
    for center_dir in generated_centers(cohort_dir):
        center, kind = center_dir.name, kinds[center_dir.name]
        manifest = Manifest.loads((center_dir / MANIFEST_NAME).read_bytes())
        rows = [(center, "all", s.slide_id, s.grade != "NILM") for s in manifest.slides]
        if kind == "internal":
            split = assign_splits(rows, SplitConfig(val=0.0, test=test_fraction, seed=seed))
            train = [k[2] for k, v in split.items() if v == "train"]
            test = [k[2] for k, v in split.items() if v == "test"]
            if not train or not test:
                raise CCSError(
                    f"internal center {center} has {len(manifest.slides)} slides: too few to "
                    "keep some for training and some for test; raise --slides-per-center"
                )
            name = f"{tag}-train"
            folder = sub_batch(center_dir, train, name, out)
            cut.append((folder, StudyBatch(center=center, batch=name, kind=kind, role="train",
                                           slides=len(train))))  # fmt: skip
        else:
            test = [s.slide_id for s in manifest.slides]
        # batches in a seeded order of their own, independent of how ids were numbered
        test.sort(key=lambda sid: hashlib.sha256(f"{seed}:{center}:{sid}".encode()).digest())
        for i in range(0, len(test), batch_slides):
            part = test[i : i + batch_slides]
            name = f"{tag}-test{i // batch_slides + 1}"
            folder = sub_batch(center_dir, part, name, out)
            cut.append((folder, StudyBatch(center=center, batch=name, kind=kind, role="test",
                                           slides=len(part))))  # fmt: skip
    return cut
