"""``ccs models import``: published encoder, MeanMIL and prototype files into the store.

The published files are rebuilt here at toy size in the reference's own layouts (a DINOv2
teacher checkpoint with chunked blocks and its heads, Meta's plain DINOv2 keys, MeanMIL's
``head.<i>`` state dict, the ``proto_bank`` dict), from networks whose outputs the imported
models must reproduce. No Ray, no download.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from smartccs.errors import CCSError
from smartccs.models import load_encoder, load_prototypes, load_slide_head
from smartccs.models.artifacts import Architecture, Normalization, load_card
from smartccs.models.dinov2_keys import to_timm
from smartccs.models.encoder import build_from
from smartccs.models.importer import import_models
from smartccs.models.zoo import ZOO, ZooEntry
from smartccs.store import Store, StoreConfig
from smartccs.taxonomy import GRADES
from tests.cli import assert_one_line_error, run_ccs

DIM = 48
TINY = Architecture(
    timm_name="vit_small_patch14_dinov2",
    kwargs={"img_size": 56, "depth": 4, "embed_dim": DIM, "num_heads": 3},
)


def tiny_kind(layout: str = "dinov2-teacher-chunked") -> ZooEntry:
    return ZooEntry(
        name="tiny-dinov2",
        architecture=TINY,
        layout=layout,
        normalization=Normalization(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        input_px=56,
        embed_dim=DIM,
        source="built by tests/test_models_import.py",
        licence="none: random weights",
    )


def source_network(seed: int = 0) -> torch.nn.Module:
    """A tiny DINOv2-style ViT with every tensor random (LayerScale too, so no block is ~0)."""
    net = build_from(TINY)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net.eval()


def teacher_chunked(state: dict, chunks: int = 2, depth: int = 4) -> dict:
    """The DINOv2 training checkpoint layout: blocks.<chunk>.<global i>, backbone. prefix."""
    per = depth // chunks
    teacher = {}
    for key, value in state.items():
        if key.startswith("blocks."):
            i = int(key.split(".")[1])
            key = f"blocks.{i // per}.{key.partition('.')[2]}"
        teacher[f"backbone.{key}"] = value
    teacher.setdefault("backbone.mask_token", torch.zeros(1, DIM))
    teacher["dino_head.mlp.0.weight"] = torch.randn(64, DIM)
    teacher["dino_head.last_layer.weight_g"] = torch.ones(128, 1)
    teacher["ibot_head.mlp.0.weight"] = torch.randn(64, DIM)
    return {"teacher": teacher}


def plain_dinov2(state: dict) -> dict:
    return {**state, "mask_token": torch.zeros(1, DIM)}


def new_store(tmp_path: Path) -> Store:
    return Store(StoreConfig(uri=str(tmp_path / "store")))


def models_in(store: Store) -> list[str]:
    return store.list_dirs("models")


def pixels(n: int = 3, px: int = 56) -> torch.Tensor:
    return torch.randn(n, 3, px, px, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("chunks", [2, 4])
def test_teacher_checkpoint_imports_to_the_network_it_came_from(tmp_path, chunks):
    net = source_network()
    path = tmp_path / "CCS_tiny.pth"
    torch.save(teacher_chunked(net.state_dict(), chunks), path)
    store = new_store(tmp_path)
    [done] = import_models(store, encoder=path, kind=tiny_kind(), name="ccs-tiny")
    enc = load_encoder(store.uri(), "ccs-tiny")
    assert not enc.training and enc.embed_dim == DIM
    x = pixels()
    with torch.no_grad():
        want = net.forward_features(x)[:, 0]  # the CLS token after the final norm
        got = enc(x)
    assert got.shape == (3, DIM)
    assert (got - want).abs().max() <= 1e-5
    card = load_card(store, "ccs-tiny")
    assert card.head["source"]["sha256"] == done.sha256 and not card.synthetic
    dropped = card.head["conversion"]["dropped"]
    assert "mask_token" in dropped and "dino_head.mlp.0.weight" in dropped


def test_plain_dinov2_file_imports_the_same(tmp_path):
    net = source_network(3)
    path = tmp_path / "dinov2_tiny.pth"
    torch.save(plain_dinov2(net.state_dict()), path)
    store = new_store(tmp_path)
    [done] = import_models(store, encoder=path, kind=tiny_kind("dinov2"), name="dino")
    enc = load_encoder(store.uri(), done.ref)  # name/version
    with torch.no_grad():
        assert (enc(pixels()) - net.forward_features(pixels())[:, 0]).abs().max() <= 1e-5


def dinov2_runtime_pos_embed(pos_embed: torch.Tensor, px: int, patch: int) -> torch.Tensor:
    """What Meta's DINOv2 adds to the tokens of a px x px input (interpolate_pos_encoding)."""
    n = pos_embed.shape[1] - 1
    m = int(n**0.5)
    g = px // patch
    grid = pos_embed[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    s = (g + 0.1) / m
    grid = F.interpolate(grid, scale_factor=(s, s), mode="bicubic", antialias=False)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, g * g, -1)], 1)


def test_a_larger_dinov2_grid_is_resampled_as_dinov2_does_at_run_time(tmp_path):
    state = source_network(4).state_dict()
    big = torch.randn(1, 1 + 8 * 8, DIM)  # trained at 112 px, used at 56 px
    path = tmp_path / "dinov2_112.pth"
    torch.save(plain_dinov2({**state, "pos_embed": big}), path)
    store = new_store(tmp_path)
    import_models(store, encoder=path, kind=tiny_kind("dinov2"), name="dino")
    enc = load_encoder(store.uri(), "dino")
    got = enc.backbone.pos_embed.detach()
    assert torch.allclose(got, dinov2_runtime_pos_embed(big, 56, 14), atol=1e-6)
    assert load_card(store, "dino").head["conversion"]["pos_embed_resampled"] == "8x8 -> 4x4"


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda t: t.pop("backbone.blocks.1.3.mlp.fc2.bias"), "blocks.3.mlp.fc2.bias"),
        (lambda t: t.update({"backbone.blocks.0.1.extra": torch.ones(1)}), "blocks.0.1.extra"),
        (lambda t: t.update({"student.cls_token": torch.ones(1)}), "student.cls_token"),
        (
            lambda t: t.update(
                {"backbone.blocks.0.3.norm1.bias": t.pop("backbone.blocks.1.3.norm1.bias")}
            ),
            "blocks.0.3.norm1.bias",
        ),
        (lambda t: t.update({"backbone.norm.bias": torch.ones(DIM + 1)}), "norm.bias"),
    ],
)
def test_a_missing_extra_or_misplaced_backbone_tensor_is_refused_by_name(tmp_path, edit, named):
    ckpt = teacher_chunked(source_network().state_dict(), 2)
    edit(ckpt["teacher"])
    path = tmp_path / "CCS_edited.pth"
    torch.save(ckpt, path)
    store = new_store(tmp_path)
    with pytest.raises(CCSError) as err:
        import_models(store, encoder=path, kind=tiny_kind(), name="x")
    assert "CCS_edited.pth" in str(err.value) and named in str(err.value)
    assert "\n" not in str(err.value)
    assert models_in(store) == []


def meanmil_file(tmp_path: Path, dropout: bool, in_dim: int = DIM) -> tuple[Path, dict]:
    g = torch.Generator().manual_seed(5)
    last = 3 if dropout else 2
    state = {
        "head.0.weight": torch.randn(512, in_dim, generator=g) * 0.1,
        "head.0.bias": torch.randn(512, generator=g) * 0.1,
        f"head.{last}.weight": torch.randn(len(GRADES), 512, generator=g) * 0.1,
        f"head.{last}.bias": torch.randn(len(GRADES), generator=g) * 0.1,
    }
    path = tmp_path / "MeanMIL.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("dropout", [False, True])
def test_meanmil_logits_are_the_mean_of_each_cell_s_logits(tmp_path, dropout):
    path, sd = meanmil_file(tmp_path, dropout)
    store = new_store(tmp_path)
    import_models(store, mil=path, kind=tiny_kind(), name="ccs")
    head = load_slide_head(store.uri(), "ccs-meanmil")
    assert not head.training and head.card.task == "slide_head"
    cells = torch.randn(17, DIM)
    last = 3 if dropout else 2
    per_cell = [
        F.linear(
            F.relu(F.linear(c, sd["head.0.weight"], sd["head.0.bias"])),
            *(sd[f"head.{last}.weight"], sd[f"head.{last}.bias"]),
        )
        for c in cells
    ]
    with torch.no_grad():
        got = head(cells)
    assert got.shape == (len(GRADES),)
    assert torch.allclose(got, torch.stack(per_cell).mean(0), atol=1e-6)


def bank_file(tmp_path: Path, feat_dim: int = DIM, width: int = DIM) -> tuple[Path, dict]:
    g = torch.Generator().manual_seed(6)
    bank = {c: torch.randn(3, width, generator=g) for c in range(len(GRADES))}
    path = tmp_path / "proto_bank.pth"
    payload = {"proto_bank": bank, "n_classes": len(GRADES), "top_w": 3, "feat_dim": feat_dim}
    torch.save(payload, path)
    return path, bank


def test_prototype_bank_round_trips(tmp_path):
    path, bank = bank_file(tmp_path)
    store = new_store(tmp_path)
    import_models(store, prototypes=path, kind=tiny_kind(), name="ccs")
    header, tensors = load_prototypes(store.uri(), "ccs-prototypes")
    assert (header.n_classes, header.top_w, header.feat_dim) == (len(GRADES), 3, DIM)
    assert header.counts == [3] * len(GRADES)
    assert sorted(tensors) == list(range(len(GRADES)))
    assert all(torch.equal(tensors[c], bank[c]) for c in bank)
    assert load_card(store, "ccs-prototypes").classes == list(GRADES)


@pytest.mark.parametrize(
    "feat_dim, width, why", [(DIM + 1, DIM, "feat_dim says"), (32, 32, "feat_dim is 32")]
)
def test_a_bank_whose_feat_dim_disagrees_is_refused(tmp_path, feat_dim, width, why):
    path, _ = bank_file(tmp_path, feat_dim, width)
    store = new_store(tmp_path)
    with pytest.raises(CCSError, match=why) as err:
        import_models(store, prototypes=path, kind=tiny_kind(), name="ccs")
    assert "proto_bank.pth" in str(err.value)
    assert models_in(store) == []


def test_wrong_and_truncated_files_are_refused_and_nothing_is_written(tmp_path):
    store = new_store(tmp_path)
    good = tmp_path / "CCS_good.pth"
    torch.save(teacher_chunked(source_network().state_dict()), good)
    truncated = tmp_path / "CCS_truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    mil, _ = meanmil_file(tmp_path, False)
    cases = [
        ({"encoder": truncated}, "CCS_truncated.pth: not a readable PyTorch checkpoint"),
        ({"encoder": text}, "notes.pth: not a readable"),
        ({"encoder": mil}, "MeanMIL.pth: no 'teacher' entry"),
        ({"mil": good}, "CCS_good.pth: not a state dict"),
        ({"prototypes": mil}, "MeanMIL.pth: expected the keys"),
        ({"encoder": good, "mil": truncated}, "CCS_truncated.pth"),  # the good one not saved
    ]
    for files, why in cases:
        with pytest.raises(CCSError, match=why):
            import_models(store, kind=tiny_kind(), name="ccs", **files)
    assert models_in(store) == []


def test_ccs_models_import_prints_the_refs_and_both_ref_forms_load(tmp_path):
    net = source_network()
    enc_path = tmp_path / "CCS_tiny.pth"
    torch.save(teacher_chunked(net.state_dict()), enc_path)
    mil, _ = meanmil_file(tmp_path, False)
    bank, _ = bank_file(tmp_path)
    kind = tmp_path / "tiny.json"
    kind.write_text(tiny_kind().model_dump_json())
    store = tmp_path / "store"
    res = run_ccs(
        "models", "import", "--store", str(store), "--encoder", str(enc_path),
        "--encoder-kind", str(kind), "--mil", str(mil), "--prototypes", str(bank),
        "--name", "ccs", "--json",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    imported = json.loads(res.stdout)["imported"]
    assert [i["role"] for i in imported] == ["encoder", "slide_head", "prototypes"]
    refs = {i["role"]: i["ref"] for i in imported}
    assert refs["encoder"].startswith("ccs/") and refs["slide_head"].startswith("ccs-meanmil/")
    x = pixels()
    with torch.no_grad():
        a = load_encoder(str(store), "ccs")(x)
        b = load_encoder(str(store), refs["encoder"])(x)
        assert torch.equal(a, b) and (a - net.forward_features(x)[:, 0]).abs().max() <= 1e-5
        head = load_slide_head(str(store), "ccs-meanmil")
        assert head(a).shape == (len(GRADES),)
    assert head.card.head["encoder"] == dict(
        zip(("name", "version"), refs["encoder"].split("/"), strict=True)
    )

    bad = run_ccs("models", "import", "--store", str(store), "--mil", str(enc_path))
    assert_one_line_error(bad, "CCS_tiny.pth")


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_zoo_kind_builds_with_its_stated_embedding_width(name):
    entry = ZOO[name]
    with torch.device("meta"):
        net = build_from(entry.architecture)
    width = int(net.num_features) * (2 if entry.embedding == "cls+mean-patch" else 1)
    assert width == entry.embed_dim
    assert int(net.patch_embed.img_size[0]) == entry.input_px
    json.dumps(entry.model_dump(mode="json"))  # a card can carry it


def test_the_models_package_imports_no_torch():
    code = "import sys, smartccs.models; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("kind", ["smart-ccs-vitl14", "dinov2-vitl14"])
def test_the_published_vit_l_layouts_fill_the_network_exactly(kind):
    """The real sizes, on the meta device: CCS_vitL_100M.pth's 4 chunks of 6 blocks with
    global indices, and Meta's dinov2_vitl14_pretrain.pth with its 37x37 grid."""
    entry = ZOO[kind]
    with torch.device("meta"):
        target = {k: v.shape for k, v in build_from(entry.architecture).state_dict().items()}
        state = {k: torch.empty(s) for k, s in target.items()}
        state["mask_token"] = torch.empty(1, 1024)
        if entry.layout == "dinov2":
            state["pos_embed"] = torch.empty(1, 1 + 37 * 37, 1024)
            raw = state
        else:
            raw = teacher_chunked(state, chunks=4, depth=24)
        out, report = to_timm(raw, entry.layout, target)
    assert {k: v.shape for k, v in out.items()} == target
    assert report.pos_embed_resampled == (None if kind == "smart-ccs-vitl14" else "37x37 -> 16x16")
