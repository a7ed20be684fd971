"""The encoder zoo: the published encoders ``ccs models import`` knows how to read.

Each kind says which timm network holds the weights, how the published file lays them out, how
pixels are normalised and how the network's tokens become one embedding. Everything is plain
JSON so that it can be written into a model card: the two keyword arguments timm needs as
classes (``mlp_layer``, ``act_layer``) are stored by name and resolved when the network is
built (smartccs.models.encoder.build_from). No kind is ever downloaded: the user brings the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from smartccs.errors import CCSError, describe_validation_error
from smartccs.models.artifacts import Architecture, Normalization
from smartccs.models.cells import CropGeometry
from smartccs.slide.tiling import TilingConfig

Layout = Literal["timm", "dinov2", "dinov2-teacher-chunked"]
"""``timm``: a timm state dict as is. ``dinov2``: Meta's DINOv2 keys (``blocks.<i>.``,
``mask_token``, ``register_tokens``). ``dinov2-teacher-chunked``: a DINOv2 training checkpoint,
the teacher's weights under ``["teacher"]["backbone."]`` with blocks in FSDP chunks
(``blocks.<chunk>.<i>.``, ``i`` counted over the whole network) next to its DINO/iBOT heads."""

EmbeddingRule = Literal["cls", "cls+mean-patch"]
"""``cls``: the class token after the final norm. ``cls+mean-patch``: that, concatenated with
the mean of the patch tokens (register tokens excluded), as Virchow2's card defines it."""


class ZooEntry(BaseModel):
    """One encoder kind: what to build, how to read its published file, how to use it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    architecture: Architecture
    layout: Layout
    normalization: Normalization
    embedding: EmbeddingRule = "cls"
    input_px: int = 224
    embed_dim: int = Field(description="width of the embedding the kind produces")
    tiling: TilingConfig = TilingConfig(tile_px=224)
    crop: CropGeometry | None = Field(default=None, description="cell crops (Smart-CCS only)")
    source: str = Field(description="where the published file comes from")
    licence: str = Field(description="terms the weights come under, as their publisher states")


_HALF = Normalization(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
_IMAGENET = Normalization()

ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry(
            name="smart-ccs-vitl14",
            architecture=Architecture(
                timm_name="vit_large_patch14_dinov2", kwargs={"img_size": 224}
            ),
            layout="dinov2-teacher-chunked",
            normalization=_HALF,
            embed_dim=1024,
            tiling=TilingConfig(tile_px=1200),
            crop=CropGeometry(),
            source="CCS_vitL_100M.pth from the Smart-CCS release (github.com/hjiangaz/Smart-CCS, "
            "Google Drive link in its README)",
            licence="Smart-CCS: its README says Apache-2.0, its LICENSE file is GPL-3.0; no "
            "separate terms for the weights",
        ),
        ZooEntry(
            name="dinov2-vitl14",
            architecture=Architecture(
                timm_name="vit_large_patch14_dinov2", kwargs={"img_size": 224}
            ),
            layout="dinov2",
            normalization=_IMAGENET,
            embed_dim=1024,
            source="dinov2_vitl14_pretrain.pth (Meta, facebookresearch/dinov2); its 37x37 "
            "position grid is resampled to 16x16 at import as the reference does at run time",
            licence="Apache-2.0 (Meta DINOv2)",
        ),
        ZooEntry(
            name="uni",
            architecture=Architecture(
                timm_name="vit_large_patch16_224",
                kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
            ),
            layout="timm",
            normalization=_IMAGENET,
            embed_dim=1024,
            source="pytorch_model.bin of huggingface.co/MahmoodLab/UNI (gated)",
            licence="CC-BY-NC-ND-4.0, academic research only (MahmoodLab UNI card)",
        ),
        ZooEntry(
            name="uni2-h",
            architecture=Architecture(
                timm_name="vit_giant_patch14_224",
                kwargs={
                    "img_size": 224,
                    "patch_size": 14,
                    "depth": 24,
                    "num_heads": 24,
                    "init_values": 1e-5,
                    "embed_dim": 1536,
                    "mlp_ratio": 2.66667 * 2,
                    "no_embed_class": True,
                    "mlp_layer": "SwiGLUPacked",
                    "act_layer": "SiLU",
                    "reg_tokens": 8,
                    "dynamic_img_size": True,
                },
            ),
            layout="timm",
            normalization=_IMAGENET,
            embed_dim=1536,
            source="pytorch_model.bin of huggingface.co/MahmoodLab/UNI2-h (gated)",
            licence="CC-BY-NC-ND-4.0, academic research only (MahmoodLab UNI2-h card)",
        ),
        ZooEntry(
            name="h-optimus-0",
            architecture=Architecture(
                timm_name="vit_giant_patch14_reg4_dinov2",
                kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
            ),
            layout="timm",
            normalization=Normalization(
                mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517)
            ),
            embed_dim=1536,
            source="pytorch_model.bin of huggingface.co/bioptimus/H-optimus-0",
            licence="Apache-2.0 (Bioptimus H-optimus-0 card)",
        ),
        ZooEntry(
            name="virchow2",
            architecture=Architecture(
                timm_name="vit_huge_patch14_224",
                kwargs={
                    "img_size": 224,
                    "init_values": 1e-5,
                    "mlp_ratio": 5.3375,
                    "mlp_layer": "SwiGLUPacked",
                    "act_layer": "SiLU",
                    "reg_tokens": 4,
                    "no_embed_class": True,
                    "dynamic_img_size": True,
                },
            ),
            layout="timm",
            normalization=_IMAGENET,
            embedding="cls+mean-patch",
            embed_dim=2560,
            source="pytorch_model.bin of huggingface.co/paige-ai/Virchow2 (gated)",
            licence="CC-BY-NC-ND-4.0, non-commercial (Paige Virchow2 card)",
        ),
        ZooEntry(
            name="prov-gigapath",
            architecture=Architecture(
                timm_name="vit_giant_patch14_dinov2",
                kwargs={
                    "img_size": 224,
                    "patch_size": 16,
                    "embed_dim": 1536,
                    "depth": 40,
                    "num_heads": 24,
                    "init_values": 1e-5,
                    "mlp_ratio": 5.33334,
                },
            ),
            layout="timm",
            normalization=_IMAGENET,
            embed_dim=1536,
            source="pytorch_model.bin (tile encoder) of huggingface.co/prov-gigapath/"
            "prov-gigapath (gated); 16 px patches as its config.json says",
            licence="research use only, not for clinical decisions (Prov-GigaPath card)",
        ),
    ]
}
"""The known kinds, by name."""


M = TypeVar("M", bound=BaseModel)


def read_json_file(path: Path, model: type[M]) -> M:
    """A ``model`` from a .json file the user gives (a kind, a detector shape), or one error
    line naming the file and what is wrong."""
    try:
        return model.model_validate(json.loads(path.read_text()))
    except OSError as exc:
        raise CCSError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise CCSError(f"{path}: not JSON ({exc.msg}, line {exc.lineno})") from None
    except ValidationError as exc:
        raise CCSError(f"{path}: {describe_validation_error(exc)}") from None


def zoo_entry(kind: str) -> ZooEntry:
    """A kind by name, or a JSON file holding one (a DINOv2 of another size, say)."""
    if kind in ZOO:
        return ZOO[kind]
    path = Path(kind)
    if path.suffix == ".json" and path.is_file():
        return read_json_file(path, ZooEntry)
    raise CCSError(
        f"unknown encoder kind {kind!r}: use one of {', '.join(ZOO)} or a .json file of a kind"
    )
