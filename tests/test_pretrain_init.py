"""Continued pretraining: a run can start from an encoder of the store, as the reference starts
from Meta's DINOv2 weights (issue 29, point 6).

No Ray: what is pinned before the job starts (``plan_pretrain``) and what each Ray Train worker
builds (``Learner``) are checked directly; the Ray Train loop itself is test_pretrain.py's. The
encoder is a tiny DINOv2-layout ViT imported through ``ccs models import``'s code path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from smartccs.errors import CCSError
from smartccs.models import load_encoder
from smartccs.models.artifacts import Normalization, load_card, save_model
from smartccs.models.importer import import_models
from smartccs.store import Store, StoreConfig
from smartccs.train.dino import DinoConfig
from smartccs.train.multicrop import MultiCropConfig
from smartccs.train.pretrain import Learner, PretrainConfig, _lineage, plan_pretrain
from smartccs.upload import upload_batch
from tests.test_models_import import TINY, plain_dinov2, source_network, tiny_kind


@pytest.fixture
def store_with_encoder(tmp_path: Path, tiny_cohort: Path) -> Store:
    """A store with one committed batch and a tiny DINOv2 imported as ``dinov2-tiny``."""
    store = Store(StoreConfig(uri=str(tmp_path / "store")))
    center = sorted(p.parent for p in tiny_cohort.glob("*/manifest.json"))[0]
    upload_batch(center, center=center.name, batch="b1", store=store, progress=False)
    path = tmp_path / "dinov2_tiny.pth"
    torch.save(plain_dinov2(source_network().state_dict()), path)
    import_models(store, encoder=path, kind=tiny_kind("dinov2"), name="dinov2-tiny")
    return store


def config(store: Store, **kw) -> PretrainConfig:
    return PretrainConfig(
        run_name="continued", store=store.config,
        crops=kw.pop("crops", MultiCropConfig(global_size=56, local_size=28, n_local=2)),
        dino=DinoConfig(out_dim=32, hidden_dim=16, bottleneck_dim=8), **kw,
    )  # fmt: skip


def test_a_run_from_an_imported_encoder_is_pinned_to_it_and_takes_its_network(
    store_with_encoder: Store,
):
    store = store_with_encoder
    card = load_card(store, "dinov2-tiny")
    planned = plan_pretrain(config(store, init_from="dinov2-tiny"))
    assert planned.init_from == f"dinov2-tiny/{card.version}", "pinned at job start"
    assert planned.encoder.timm_name == TINY.timm_name
    assert planned.encoder.kwargs == TINY.kwargs | {"dynamic_img_size": True}  # local views
    assert planned.crops.normalization == card.normalization, "'auto': the network's own"
    assert plan_pretrain(planned) == planned, "planning a planned run changes nothing"

    mine = Normalization(mean=(0.8, 0.7, 0.8), std=(0.2, 0.2, 0.2))
    crops = MultiCropConfig(global_size=56, local_size=28, n_local=2, normalization=mine)
    kept = plan_pretrain(config(store, init_from="dinov2-tiny", crops=crops))
    assert kept.crops.normalization == mine, "a normalisation given in the config is kept"


def test_teacher_and_student_start_from_the_encoder_s_weights(store_with_encoder: Store):
    store = store_with_encoder
    planned = plan_pretrain(config(store, init_from="dinov2-tiny"))
    learner = Learner(planned, torch.device("cpu"))
    want = load_encoder(store, "dinov2-tiny").backbone.state_dict()
    for net in (learner.raw_student, learner.teacher):
        got = net.backbone.state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
    # and a step moves the student away from them, the teacher by its momentum only
    tiles = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    learner.prepare()
    learner.step(tiles, 0, torch.Generator().manual_seed(0))
    moved = learner.raw_student.backbone.state_dict()
    assert any(not torch.equal(moved[k], want[k]) for k in want)
    # the encoder it saves keeps how its embedding is taken, and where it started
    lineage = _lineage(store, planned)
    name, version = planned.init_from.split("/")
    assert lineage["init_from"] == {"name": name, "version": version}
    assert lineage["embedding"] == "cls" and lineage["embed_dim"] == 48


def test_a_run_from_an_encoder_the_store_lacks_says_how_to_import_one(store_with_encoder):
    with pytest.raises(CCSError, match="init_from: no encoder 'dinov2-large'.*ccs models import"):
        plan_pretrain(config(store_with_encoder, init_from="dinov2-large"))


def test_a_run_whose_crops_do_not_fit_the_encoder_it_starts_from_is_refused(
    store_with_encoder: Store,
):
    crops = MultiCropConfig(global_size=96, local_size=48, n_local=2)  # the demo encoder's
    with pytest.raises(CCSError, match=r"init_from dinov2-tiny/\S+: .*global_size 96"):
        plan_pretrain(config(store_with_encoder, init_from="dinov2-tiny", crops=crops))


def test_a_trained_detector_is_not_an_encoder_to_start_from(store_with_encoder: Store):
    store = store_with_encoder
    card = load_card(store, "dinov2-tiny").model_copy(update={"name": "det", "task": "detector"})
    save_model(store, card, load_encoder(store, "dinov2-tiny").backbone.state_dict())
    with pytest.raises(CCSError, match="is a detector, not a encoder"):
        plan_pretrain(config(store, init_from="det"))
