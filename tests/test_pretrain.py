"""DINO pretraining end to end on Ray Train: tiles stream in, an encoder artifact comes out."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray.train.torch
import torch
import yaml

from smartccs.data.tiles import StreamConfig
from smartccs.models.artifacts import Architecture, Normalization, list_versions, load_model
from smartccs.models.encoder import build_from
from smartccs.slide.tiling import TilingConfig
from smartccs.store import Store
from smartccs.train.dino import DinoConfig
from smartccs.train.loop import FINISHED_FILE
from smartccs.train.multicrop import MultiCropConfig
from smartccs.train.normalization import NORMALIZATION_FILE
from smartccs.train.pretrain import PretrainConfig, pretrain
from smartccs.upload import upload_batch

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

REPO = Path(__file__).resolve().parents[1]


def toy_config(store: Store, tmp_path: Path, max_steps: int) -> PretrainConfig:
    return PretrainConfig(
        run_name="toy-run",
        store=store.config,
        encoder=Architecture(
            timm_name="vit_tiny_patch16_224",
            kwargs={
                "img_size": 32,
                "patch_size": 8,
                "embed_dim": 32,
                "depth": 2,
                "num_heads": 2,
                "dynamic_img_size": True,
            },
        ),
        crops=MultiCropConfig(global_size=32, local_size=16, n_local=2),
        dino=DinoConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16),
        stream=StreamConfig(
            tiling=TilingConfig(target_mpp=1.0, tile_px=128),
            readers=1,
            reader_cpus=0.5,
            planner_cpus=0.25,
            batch_size=8,
            cache_dir=str(tmp_path / "cache"),
        ),
        batch_size=4,
        max_steps=max_steps,
        checkpoint_every=2,
    )


def test_pretrain_saves_an_encoder_and_resumes(tiny_cohort, local_store, tmp_path, monkeypatch):
    center_dir = sorted(p.parent for p in tiny_cohort.glob("*/manifest.json"))[0]
    upload_batch(center_dir, center=center_dir.name, batch="b1", store=local_store, progress=False)

    first = pretrain(toy_config(local_store, tmp_path, max_steps=3))
    assert (first.start_step, first.step) == (0, 3)
    card, weights = load_model(local_store, "encoder")
    assert card.version == first.version and card.task == "encoder" and card.synthetic
    assert card.tiling.tile_px == 128 and card.metrics["steps"] == 3
    assert len(card.data_manifest_sha256) == 64 and len(card.training_config_sha256) == 64
    # normalization was estimated from the cytology tiles (bright glass), not ImageNet's
    assert card.normalization != Normalization() and min(card.normalization.mean) > 0.7
    assert local_store.exists(local_store.key_of(first.run_path), NORMALIZATION_FILE)
    encoder = build_from(card.architecture)
    encoder.load_state_dict(weights)  # strict: the artifact is exactly the encoder
    with torch.no_grad():
        assert encoder(torch.rand(1, 3, 32, 32)).shape == (1, 32)
    assert local_store.list("runs", "toy-run"), "checkpoints live under runs/<run name>"

    second = pretrain(toy_config(local_store, tmp_path, max_steps=5))
    assert (second.start_step, second.step) == (3, 5), "same run name continues, not restarts"
    assert list_versions(local_store, "encoder") == sorted([first.version, second.version])
    assert load_model(local_store, "encoder")[0].version == max(first.version, second.version)

    # the finished run again: its final checkpoint, read from the store without a trainer
    def no_trainer(*args, **kwargs):
        raise AssertionError("a finished run started a trainer")

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", no_trainer)
    third = pretrain(toy_config(local_store, tmp_path, max_steps=5))
    assert (third.start_step, third.step) == (3, 5)
    _, again = load_model(local_store, "encoder", third.version)
    for k, v in load_model(local_store, "encoder", second.version)[1].items():
        torch.testing.assert_close(again[k], v)


def test_demo_config_validates():
    raw = yaml.safe_load((REPO / "jobs/configs/pretrain-demo.yaml").read_text())
    cfg = PretrainConfig.model_validate(raw)
    assert cfg.crops.global_size == cfg.encoder.kwargs["img_size"]
    assert cfg.scaling.cpus_per_worker < 1
    with pytest.raises(ValueError, match="global_size"):
        PretrainConfig.model_validate(raw | {"crops": {"global_size": 64}})


@pytest.mark.s3
def test_pretrain_on_an_s3_store_checkpoints_and_saves_there(
    tiny_cohort, s3_store, tmp_path, monkeypatch
):
    """storage_path on S3 through a custom endpoint (moto's HTTP server standing in for AWS)."""
    center_dir = sorted(p.parent for p in tiny_cohort.glob("*/manifest.json"))[0]
    upload_batch(center_dir, center=center_dir.name, batch="b1", store=s3_store, progress=False)
    result = pretrain(toy_config(s3_store, tmp_path, max_steps=2))
    assert result.run_path.startswith("s3://")
    keys = s3_store.list("runs", "toy-run")
    assert any("checkpoint" in k for k in keys), keys
    assert any(k.endswith(f"toy-run/{FINISHED_FILE}") for k in keys), keys
    card, _ = load_model(s3_store, "encoder")
    assert card.version == result.version and card.metrics["steps"] == 2
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", None)  # finished: read back, not run
    assert pretrain(toy_config(s3_store, tmp_path, max_steps=2)).step == 2
