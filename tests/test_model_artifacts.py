"""Model artifacts: committed once, found through LATEST, refused when tampered or half-written."""

from __future__ import annotations

import json

import pytest
import torch

from smartccs import layout
from smartccs.errors import AlreadyCommittedError, StoreError
from smartccs.models.artifacts import (
    CARD_NAME,
    WEIGHTS_NAME,
    Architecture,
    ModelCard,
    config_sha256,
    data_sha256,
    latest_version,
    list_versions,
    load_model,
    new_version,
    save_model,
)
from smartccs.slide.tiling import TilingConfig
from smartccs.store import Store


def make_card(**update) -> ModelCard:
    cfg = {"lr": 1e-3, "epochs": 2}
    return ModelCard(
        name="encoder",
        architecture=Architecture(timm_name="vit_tiny_patch16_224", kwargs={"img_size": 96}),
        task="encoder",
        tiling=TilingConfig(target_mpp=1.0, tile_px=128),
        training_config=cfg,
        training_config_sha256=config_sha256(cfg),
        data_manifest_sha256=data_sha256(["b" * 64, "a" * 64]),
        metrics={"loss": 1.5},
        synthetic=True,
    ).model_copy(update=update)


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(4, 3, generator=g), "a.bias": torch.randn(4, generator=g)}


def test_round_trip(any_store: Store):
    sd = weights(0)
    version = save_model(any_store, make_card(), sd)
    card, loaded = load_model(any_store, "encoder", version)
    assert card.version == version and card.name == "encoder"
    assert card.tiling.tile_px == 128 and card.architecture.kwargs == {"img_size": 96}
    assert card.synthetic and card.metrics == {"loss": 1.5} and card.created_at
    assert loaded.keys() == sd.keys()
    for k in sd:
        assert torch.equal(loaded[k], sd[k])


def test_committed_version_is_never_overwritten(any_store: Store):
    version = save_model(any_store, make_card(), weights(0))
    with pytest.raises(AlreadyCommittedError):
        save_model(any_store, make_card(version=version), weights(1))
    _, loaded = load_model(any_store, "encoder", version)
    assert torch.equal(loaded["a.bias"], weights(0)["a.bias"])


def test_latest_names_the_newest_committed_version(any_store: Store):
    with pytest.raises(StoreError, match="no committed version"):
        load_model(any_store, "encoder")
    first = save_model(any_store, make_card(), weights(0))
    second = save_model(any_store, make_card(), weights(1))
    newest = max(first, second)
    assert latest_version(any_store, "encoder") == newest
    assert load_model(any_store, "encoder")[0].version == newest
    assert list_versions(any_store, "encoder") == sorted([first, second])
    # an older version saved late (e.g. a retried job) does not move LATEST backwards
    old = save_model(any_store, make_card(version="v20000101T000000-abcdef"), weights(2))
    assert latest_version(any_store, "encoder") == newest
    assert load_model(any_store, "encoder", old)[0].version == old


def test_uncommitted_version_is_invisible(any_store: Store):
    committed = save_model(any_store, make_card(), weights(0))
    crashed = new_version()
    prefix = layout.model("encoder", crashed)
    any_store.write_bytes(f"{prefix}/{WEIGHTS_NAME}", b"partial")
    any_store.write_bytes(
        f"{prefix}/{CARD_NAME}", make_card(version=crashed).model_dump_json().encode()
    )
    with pytest.raises(StoreError, match="not a committed model version"):
        load_model(any_store, "encoder", crashed)
    assert list_versions(any_store, "encoder") == [committed]
    assert load_model(any_store, "encoder")[0].version == committed


def test_tampered_weights_and_card_are_refused(any_store: Store):
    version = save_model(any_store, make_card(), weights(0))
    prefix = layout.model("encoder", version)
    original = any_store.read_bytes(prefix, WEIGHTS_NAME)
    from safetensors.torch import save

    any_store.write_bytes(f"{prefix}/{WEIGHTS_NAME}", save(weights(1)))
    with pytest.raises(StoreError, match="sha256 differs"):
        load_model(any_store, "encoder", version)
    any_store.write_bytes(f"{prefix}/{WEIGHTS_NAME}", original)
    card = json.loads(any_store.read_bytes(prefix, CARD_NAME))
    card["metrics"] = {"loss": 0.0}
    any_store.write_bytes(f"{prefix}/{CARD_NAME}", json.dumps(card).encode())
    with pytest.raises(StoreError, match="changed after"):
        load_model(any_store, "encoder", version)


def test_hashes_and_versions():
    assert config_sha256({"a": 1, "b": [1, 2]}) == config_sha256({"b": [1, 2], "a": 1})
    assert config_sha256({"a": 1}) != config_sha256({"a": 2})
    assert data_sha256(["x", "y"]) == data_sha256(["y", "x"])
    v = new_version()
    assert v.startswith("v") and len(v) == len("v20261121T214500123-abcdef")
    quick = [new_version() for _ in range(50)]  # many saves within one millisecond
    assert quick == sorted(quick) and len(set(quick)) == 50, "strictly increasing: LATEST follows"
