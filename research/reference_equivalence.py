"""Equivalence of smartccs's imported models with the Smart-CCS reference code itself.

Run from the root of a Smart-CCS checkout (or an export of its Cls-WSI/ folder):
    PYTHONPATH=Cls-WSI XFORMERS_DISABLED=1 /path/to/smartccs/.venv/bin/python \
        /path/to/smartccs/research/reference_equivalence.py [--full]
Builds the reference's networks with random weights, saves them in the reference's file
layouts, imports them with smartccs and compares outputs. --full uses ViT-L/14 (1.2 GB each).
"""

import sys
import tempfile
import types
from functools import partial
from pathlib import Path

import torch

for stub in ("nystrom_attention", "einops", "opt_einsum"):  # mil_model imports, unused by MeanMIL
    m = types.ModuleType(stub)
    m.NystromAttention = m.rearrange = m.repeat = object
    sys.modules.setdefault(stub, m)

from dinov2.layers import MemEffAttention  # noqa: E402
from dinov2.layers import NestedTensorBlock as Block  # noqa: E402
from dinov2.models import build_model_CCS  # noqa: E402
from dinov2.models import vision_transformer as vits  # noqa: E402
from lib.mil_model import MeanMIL  # noqa: E402

from smartccs.models import load_encoder, load_slide_head  # noqa: E402
from smartccs.models.artifacts import Architecture, Normalization  # noqa: E402
from smartccs.models.importer import import_models  # noqa: E402
from smartccs.models.zoo import ZOO, ZooEntry  # noqa: E402
from smartccs.store import Store, StoreConfig  # noqa: E402

FULL = "--full" in sys.argv
torch.manual_seed(0)


def randomize(net):
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.02 + (0.1 if p.dim() == 1 else 0))
    return net.eval()


def kind(layout, px, dim, depth, heads):
    if FULL:
        return ZOO["smart-ccs-vitl14" if layout != "dinov2" else "dinov2-vitl14"]
    arch = Architecture(
        timm_name="vit_small_patch14_dinov2",
        kwargs={"img_size": px, "depth": depth, "embed_dim": dim, "num_heads": heads},
    )
    return ZooEntry(
        name="tiny",
        architecture=arch,
        layout=layout,
        normalization=Normalization(),
        input_px=px,
        embed_dim=dim,
        source="check",
        licence="check",
    )


dim, depth, heads, px = (1024, 24, 16, 224) if FULL else (64, 8, 4, 56)
tmp = Path(tempfile.mkdtemp())
store = Store(StoreConfig(uri=str(tmp / "store")))
x = torch.randn(2, 3, px, px)
worst = {}

# 1. CCS_vitL_100M.pth: the teacher with block_chunks=4, loaded by the reference's own builder
ref = randomize(
    vits.DinoVisionTransformer(
        img_size=px,
        patch_size=14,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=4,
        init_values=1e-5,
        ffn_layer="mlp",
        block_chunks=4,
        block_fn=partial(Block, attn_class=MemEffAttention),
    )
)
teacher = {f"backbone.{k}": v for k, v in ref.state_dict().items()}
teacher |= {
    "dino_head.mlp.0.weight": torch.randn(8, dim),
    "ibot_head.mlp.0.weight": torch.randn(8, dim),
}
torch.save({"teacher": teacher}, tmp / "CCS.pth")
if FULL:  # the reference's own loader (build_model_CCS) on the very file
    ref, _ = build_model_CCS(torch.device("cpu"), 1, str(tmp / "CCS.pth"))
import_models(
    store,
    encoder=tmp / "CCS.pth",
    kind=kind("dinov2-teacher-chunked", px, dim, depth, heads),
    name="ccs",
)
with torch.no_grad():
    worst["teacher-chunked"] = (load_encoder(store, "ccs")(x) - ref(x)).abs().max().item()

# 2. Meta's dinov2 layout at a larger grid (518 px for ViT-L), used at px as torch.hub's model is
big = 518 if FULL else 112
hub = randomize(
    vits.DinoVisionTransformer(
        img_size=big,
        patch_size=14,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=4,
        init_values=1.0,
        ffn_layer="mlp",
        block_chunks=0,
        block_fn=partial(Block, attn_class=MemEffAttention),
        interpolate_antialias=False,
        interpolate_offset=0.1,
    )
)
torch.save(hub.state_dict(), tmp / "dinov2.pth")
import_models(
    store, encoder=tmp / "dinov2.pth", kind=kind("dinov2", px, dim, depth, heads), name="meta"
)
with torch.no_grad():
    worst["dinov2 (grid resampled)"] = (load_encoder(store, "meta")(x) - hub(x)).abs().max().item()

# 3. MeanMIL.pth, with and without dropout, against the reference module's logits
for dropout in (False, True):
    mil = MeanMIL(in_dim=dim, n_classes=7, dropout=dropout).eval()
    torch.save(mil.state_dict(), tmp / "MeanMIL.pth")
    import_models(
        store,
        mil=tmp / "MeanMIL.pth",
        kind=kind("dinov2-teacher-chunked", px, dim, depth, heads),
        name=f"m{int(dropout)}",
    )
    cells = torch.randn(37, dim)
    with torch.no_grad():
        got = load_slide_head(store, f"m{int(dropout)}-meanmil")(cells)
        want = mil(cells)[0][0]
    worst[f"MeanMIL dropout={dropout}"] = (got - want).abs().max().item()

for k, v in worst.items():
    print(f"{k:28s} max |diff| {v:.2e}")
assert all(v <= 1e-5 for v in worst.values()), worst
print("OK")
