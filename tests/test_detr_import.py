"""``ccs models import --detector``: the reference's Deformable-DETR cell detector.

A toy transformers Deformable DETR (ResNet-18 backbone, 32-d, 1 + 2 layers, 8 queries) with
every tensor random is written in the reference's key layout by the inverse mapping, and the
imported detector must reproduce it; the full reference shape is checked on the meta device.
No Ray, no download.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smartccs.errors import CCSError, StoreError
from smartccs.models import load_cell_detector
from smartccs.models.artifacts import load_card, models_of, require_model
from smartccs.models.deformable_detr import (
    REFERENCE_SHAPE,
    DetectorSpec,
    DetrShape,
    TileRegion,
    build_network,
    decode,
    resized_size,
    target_shapes,
)
from smartccs.models.detr_keys import BACKBONE_PREFIXES, to_reference, to_transformers
from smartccs.models.importer import import_models
from smartccs.store import Store, StoreConfig
from smartccs.taxonomy import ABNORMAL_CLASSES
from tests.cli import assert_one_line_error, run_ccs

TINY = DetrShape(
    backbone="resnet18",
    d_model=32,
    encoder_layers=1,
    decoder_layers=2,
    heads=2,
    ffn_dim=64,
    num_queries=8,
    n_points=2,
)


def random_network(seed: int = 0) -> torch.nn.Module:
    """The toy detector with every tensor random (positive BatchNorm variances)."""
    net = build_network(TINY)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            noise = torch.randn(t.shape, generator=g)
            t.copy_(noise.abs() + 0.5 if name.endswith("running_var") else noise * 0.2)
    return net.eval()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    net = random_network()
    path = tmp_path_factory.mktemp("det") / "det_cell.pth"
    torch.save(to_reference(net.state_dict()), path)
    return net, path


def new_store(tmp_path: Path) -> Store:
    return Store(StoreConfig(uri=str(tmp_path / "store")))


def tiles(n: int = 2, px: int = 96) -> torch.Tensor:
    return torch.rand(n, 3, px, px, generator=torch.Generator().manual_seed(1))


def test_reference_layout_imports_to_the_network_it_came_from(tmp_path, source):
    net, path = source
    store = new_store(tmp_path)
    [done] = import_models(store, detector=path, detector_shape=TINY, name="ccs")
    assert done.role == "cell_detector" and done.ref.startswith("ccs-detector/")
    det = load_cell_detector(store.uri(), "ccs-detector")
    assert not det.training
    x = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = net(pixel_values=x)
        logits, boxes = det(x)
    assert logits.shape == (2, TINY.num_queries, len(ABNORMAL_CLASSES))
    assert (logits - want.logits).abs().max() <= 1e-5
    assert (boxes - want.pred_boxes).abs().max() <= 1e-5
    card = load_card(store, "ccs-detector")
    assert card.task == "cell_detector" and card.classes == list(ABNORMAL_CLASSES)
    assert card.head["implementation"] == "transformers-deformable-detr"
    assert card.head["source"]["sha256"] == done.sha256 and not card.synthetic
    assert DetrShape.model_validate(card.head["detr"]) == TINY
    assert card.head["conversion"]["layout"] == "smart-ccs"


def test_upstream_deformable_detr_layout_imports_the_same(tmp_path, source):
    net, _ = source
    state = to_reference(net.state_dict(), BACKBONE_PREFIXES[1])
    state["backbone.0.body.bn1.num_batches_tracked"] = torch.tensor(0)
    path = tmp_path / "checkpoint0049.pth"
    torch.save({"model": state, "epoch": 49}, path)
    store = new_store(tmp_path)
    import_models(store, detector=path, detector_shape=TINY, name="up")
    conversion = load_card(store, "up-detector").head["conversion"]
    assert conversion["layout"] == "deformable-detr"
    assert conversion["dropped"] == ["backbone.0.body.bn1.num_batches_tracked"]
    det = load_cell_detector(store.uri(), "up-detector")
    x = tiles(1, 96)
    with torch.no_grad():
        assert (det(x)[0] - net(pixel_values=x).logits).abs().max() <= 1e-5


QKV_BIAS = "transformer.decoder.layers.0.self_attn.in_proj_bias"


def _edited(net: torch.nn.Module, edit) -> dict:
    state = {k: v.clone() for k, v in to_reference(net.state_dict()).items()}
    edit(state)
    return state


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda s: s.pop("transformer.decoder.layers.1.norm3.bias"), "final_layer_norm.bias"),
        (lambda s: s.pop("backbone.intermediate_getter.layer4.1.bn2.running_var"), "layer4.1"),
        (lambda s: s.update({"transformer.enc_output.weight": torch.ones(32, 32)}), "enc_output"),
        (lambda s: s.update({"backbone.intermediate_getter.fc.weight": torch.ones(6, 2)}), "fc."),
        (lambda s: s.update({"query_embed.weight": torch.ones(300, 64)}), "query_embed.weight"),
        (lambda s: s.update({QKV_BIAS: s[QKV_BIAS][:-1]}), "in_proj_bias"),
        (lambda s: s.update({"class_embed.1.bias": torch.zeros(6)}), "class_embed.1.bias"),
    ],
)
def test_a_missing_extra_or_misshapen_tensor_is_refused_by_name(tmp_path, source, edit, named):
    net, _ = source
    with pytest.raises(CCSError, match=named.replace(".", r"\.")):
        to_transformers(_edited(net, edit), target_shapes(TINY))
    path = tmp_path / "det_edited.pth"
    torch.save(_edited(net, edit), path)
    store = new_store(tmp_path)
    with pytest.raises(CCSError) as err:
        import_models(store, detector=path, detector_shape=TINY, name="x")
    assert "det_edited.pth" in str(err.value) and "\n" not in str(err.value)
    assert store.list_dirs("models") == []


def test_decoding_by_hand():
    """A query at (0.5, 0.25, 0.1, 0.2) on the tile at (1000, 2000), 1200 x 1200 level-0 px:
    x 1000 + 1200 * (0.45, 0.55), y 2000 + 1200 * (0.15, 0.35)."""
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    logits = torch.full((5, 6), -9.0)
    logits[0, 2] = logit(0.9)  # ASC-H
    logits[1, 2] = logit(0.8)  # the same box shifted 0.005: IoU > 0.75, suppressed
    logits[2, 5] = logit(0.21)  # AGC, above the threshold
    logits[3, 0] = logit(0.19)  # below it
    logits[4, 1], logits[4, 4] = logit(0.5), logit(0.6)  # the best class counts: SCC
    boxes = torch.tensor(
        [
            [0.5, 0.25, 0.1, 0.2],
            [0.505, 0.25, 0.1, 0.2],
            [0.1, 0.1, 0.05, 0.05],
            [0.9, 0.9, 0.05, 0.05],
            [0.5, 0.5, 0.1, 0.1],
        ]
    )
    region = TileRegion(x0=1000, y0=2000, w0=1200, h0=1200)
    got = decode(logits, boxes, region, DetectorSpec())
    assert got.labels == ["ASC-H", "SCC", "AGC"]
    assert got.scores == pytest.approx([0.9, 0.6, 0.21], abs=1e-6)
    assert got.boxes[0] == pytest.approx((1540, 2180, 1660, 2420), abs=1e-3)
    assert got.boxes[2] == pytest.approx((1090, 2090, 1150, 2150), abs=1e-3)
    wide = decode(logits[:1], boxes[:1], TileRegion(x0=0, y0=0, w0=2400, h0=600), DetectorSpec())
    assert wide.boxes[0] == pytest.approx((1080, 90, 1320, 210), abs=1e-3)
    strict = decode(logits, boxes, region, DetectorSpec(score_threshold=0.21 + 1e-6))
    assert "AGC" not in strict.labels


@pytest.mark.parametrize(
    "hw, want", [((1200, 1200), (800, 800)), ((1000, 2000), (666, 1332)), ((600, 900), (800, 1200))]
)
def test_the_reference_resize_rule(hw, want):
    assert resized_size(*hw, DetectorSpec()) == want


def test_ccs_models_import_detector_and_both_ref_forms_load(tmp_path, source):
    _, path = source
    shape = tmp_path / "tiny.json"
    shape.write_text(TINY.model_dump_json())
    store = tmp_path / "store"
    res = run_ccs(
        "models", "import", "--store", str(store), "--detector", str(path),
        "--detector-shape", str(shape), "--name", "ccs", "--json",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    [imported] = json.loads(res.stdout)["imported"]
    assert imported["role"] == "cell_detector" and imported["ref"].startswith("ccs-detector/")
    by_name = load_cell_detector(str(store), "ccs-detector")
    by_ref = load_cell_detector(str(store), imported["ref"])
    x = tiles()
    regions = [(0, 0, 1200, 1200), TileRegion(x0=1200, y0=0, w0=1200, h0=1200)]
    a, b = by_name.detect(x, regions), by_ref.detect(x, regions)
    assert a == b and len(a) == 2
    assert all(set(t.labels) <= set(ABNORMAL_CLASSES) for t in a)
    assert all(s > 0.2 for t in a for s in t.scores)
    # not a platform detector: the engine's `detector` lookups do not see it
    s = Store(StoreConfig(uri=str(store)))
    assert models_of(s, "detector") == [] and models_of(s, "cell_detector") == ["ccs-detector"]
    with pytest.raises(StoreError, match="is a cell_detector, not a detector"):
        require_model(s, "ccs-detector", "latest", "detector")

    bad = run_ccs("models", "import", "--store", str(store), "--detector", str(shape))
    assert_one_line_error(bad, "tiny.json")


def test_wrong_and_truncated_files_are_refused_and_nothing_is_written(tmp_path, source):
    _, good = source
    store = new_store(tmp_path)
    truncated = tmp_path / "det_truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    other = tmp_path / "other.pth"
    torch.save({"head.0.weight": torch.ones(2, 2)}, other)
    mil = tmp_path / "MeanMIL.pth"  # a good head of the default (ViT-L) kind
    torch.save(
        {"head.0.weight": torch.zeros(512, 1024), "head.0.bias": torch.zeros(512),
         "head.2.weight": torch.zeros(7, 512), "head.2.bias": torch.zeros(7)},
        mil,
    )  # fmt: skip
    cases = [
        ({"detector": truncated}, "det_truncated.pth: not a readable PyTorch checkpoint"),
        ({"detector": text}, "notes.pth: not a readable"),
        ({"detector": other}, "other.pth: expected the backbone under"),
        ({"detector": good}, "det_cell.pth: missing tensor .*conv3"),  # ResNet-18 for -50
        ({"mil": mil, "detector": truncated}, "det_truncated.pth"),  # the good head not saved
    ]
    for files, why in cases:
        with pytest.raises(CCSError, match=why):
            import_models(store, name="ccs", **files)
    assert store.list_dirs("models") == []


def test_the_reference_shape_is_filled_exactly_by_its_layout():
    """The full reference (torchvision ResNet-50 under backbone.intermediate_getter., 256-d,
    6 + 6 layers, 300 queries, 4 levels, 6 classes) on the meta device: no weights."""
    import torchvision
    from torchvision.ops.misc import FrozenBatchNorm2d

    target = target_shapes(REFERENCE_SHAPE)
    with torch.device("meta"):
        resnet = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
        state = {
            BACKBONE_PREFIXES[0] + k: v
            for k, v in resnet.state_dict().items()
            if not k.startswith("fc.")  # IntermediateLayerGetter stops at layer4
        }
        rest = {k: torch.empty(s) for k, s in target.items() if "backbone" not in k}
        state.update(to_reference(rest))
        out, report = to_transformers(state, target)
    assert {k: v.shape for k, v in out.items()} == target
    assert report.dropped == [] and report.tensors == len(target)
    assert target["model.query_position_embeddings.weight"] == (300, 512)
    assert target["class_embed.5.weight"] == (6, 256)
    assert target["model.level_embed"] == (4, 256)
    assert target["model.encoder.layers.5.self_attn.sampling_offsets.weight"] == (256, 256)
    assert state["transformer.decoder.layers.5.self_attn.in_proj_weight"].shape == (768, 256)


def test_the_models_package_and_loaders_import_no_transformers():
    code = (
        "import sys, smartccs.models; a = 'torch' in sys.modules; "
        "import smartccs.models.loaders; print(a, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
