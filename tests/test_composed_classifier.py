"""A classifier composed of the Smart-CCS release (issue 29, point 5), without Ray: the
reference's cell cut, MeanMIL over a slide's bag, the composition's checks and smartccs
adaptation with the imported prototype bank. The end-to-end screening run is in
test_models_screen.py."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from smartccs.adaptation.adapter import CenterAdapter
from smartccs.adaptation.config import AdaptConfig, SmartCCSAdaptConfig
from smartccs.adaptation.contrastive import adapt_step, relative_drift
from smartccs.errors import CCSError
from smartccs.models import load_slide_head
from smartccs.models.cells import CropGeometry
from smartccs.models.compose import compose_classifier
from smartccs.models.importer import import_models
from smartccs.models.slide_head import MeanMILBag, MeanMILShape
from smartccs.models.zoo import read_json_file, zoo_entry
from smartccs.screening.crops import crop_boxes
from smartccs.screening.slides import SlideClassifier, predict
from smartccs.store import Store, StoreConfig
from smartccs.taxonomy import GRADES
from tests.published_release import DIM, TOY_CROP, write_release

sys.path.insert(0, str(Path(__file__).parent))
from test_adaptation import _bags  # toy bags with an augmented view


def reference_crop(tile: Image.Image, box: tuple[float, float, float, float], g: CropGeometry):
    """Cls-WSI/lib/datasets.py's ``_crop_images`` and transform, on a tile of any side."""
    import torchvision.transforms as T

    side = tile.size[0]
    x, y, w, h = box
    x, y = max(0, x), max(0, y)
    w, h = min(side - x, w), min(side - y, h)
    cropped = tile.crop((x, y, x + w, y + h))
    width, height = int(w), int(h)
    edge = max(width, height)
    square = Image.new("RGB", (edge, edge), (0, 0, 0))
    square.paste(cropped, ((edge - width) // 2, (edge - height) // 2))
    return T.Compose([T.ToTensor(), T.Resize(g.resize_px), T.CenterCrop(g.crop_px)])(square)


def test_cells_are_cut_as_the_reference_cuts_them():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (120, 120, 3), dtype=np.uint8)
    xywh = [(10.0, 20.0, 30.0, 18.0), (100.0, 90.0, 35.0, 40.0), (-6.0, 50.0, 21.0, 21.0)]
    g = CropGeometry(resize_px=61, crop_px=56)
    want = torch.stack([reference_crop(Image.fromarray(pixels), b, g) for b in xywh])
    tile = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    boxes = torch.tensor([(x, y, x + w, y + h) for x, y, w, h in xywh])
    got = crop_boxes(tile, boxes, g)
    assert got.shape == (3, 3, 56, 56)
    assert (got - want).abs().max() < 1e-5
    assert got[1, :, :, :3].abs().max() == 0, "a box cut at the tile edge is padded black"


def test_meanmil_on_a_bag_is_the_mean_of_its_kept_cells_logits():
    torch.manual_seed(0)
    bag = MeanMILBag(MeanMILShape(in_dim=8, hidden=5)).eval()
    emb, mask = torch.randn(2, 6, 3, 8), torch.zeros(2, 6, 3, dtype=torch.bool)
    mask[0, 1, :2] = mask[0, 4, 0] = True  # slide 1 has no cell at all
    with torch.no_grad():
        logits = bag(emb, torch.rand(2, 6, 3), mask)
        want = bag.mil(emb[0][mask[0]])  # the loader's (N, D) head on the same 3 cells
    assert torch.allclose(logits[0], want, atol=1e-6)
    assert torch.softmax(logits[1], -1)[GRADES.index("NILM")] > 1 - 1e-6, "no cell: NILM"


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_release(tmp_path_factory.mktemp("release"))


def imported(store: Store, release: dict[str, Path], **files: Path | None) -> dict[str, str]:
    kind = zoo_entry(str(release["--encoder-kind"]))
    from smartccs.models.deformable_detr import DetrShape

    shape = read_json_file(release["--detector-shape"], DetrShape)
    args = {
        "encoder": release["--encoder"],
        "mil": release["--mil"],
        "prototypes": release["--prototypes"],
        "detector": release["--detector"],
    } | files
    done = import_models(store, kind=kind, detector_shape=shape, name="ccs", **args)
    return {d.role: d.ref for d in done}


def test_importing_the_whole_release_composes_a_classifier_the_engine_loads(tmp_path, release):
    store = Store(StoreConfig(uri=str(tmp_path / "store")))
    refs = imported(store, release)
    assert refs["classifier"].startswith("ccs-classifier/")
    clf = SlideClassifier(store, store_ref(refs["classifier"]))
    assert isinstance(clf.head, MeanMILBag) and not clf.head.training
    assert clf.detector.label == refs["cell_detector"]
    assert clf.encoder.label == refs["encoder"] and clf.dim == DIM
    assert clf.cells.crop == TOY_CROP and clf.top_k == TOY_CROP.top_k
    assert clf.threshold == 0.5 and clf.operating_point is None
    assert clf.card.tiling.tile_px == 1200, "cells come off the reference's 1200 px tiles"
    assert clf.head.prototypes.shape == (3 * len(GRADES), DIM)
    assert clf.head.prototype_grades.tolist() == [g for g in range(len(GRADES)) for _ in "abc"]
    head = load_slide_head(store.uri(), refs["slide_head"])
    cells = torch.randn(5, DIM)
    with torch.no_grad():
        assert torch.allclose(clf.head.mil(cells), head(cells), atol=1e-6)


def store_ref(label: str):
    from smartccs.models.refs import ModelRef

    return ModelRef.parse(label)


def test_parts_that_do_not_fit_are_refused_before_anything_is_written(tmp_path, release):
    store = Store(StoreConfig(uri=str(tmp_path / "store")))
    with pytest.raises(CCSError, match="strictly between 0 and 1"):
        import_models(store, encoder=release["--encoder"], threshold=1.5)
    assert store.list_dirs("models") == []
    refs = imported(store, release, prototypes=None)
    assert "classifier" in refs
    kind = zoo_entry(str(release["--encoder-kind"])).model_copy(update={"name": "tiny-other"})
    other = import_models(store, mil=release["--mil"], kind=kind, name="other")[0].ref
    with pytest.raises(CCSError, match="goes with tiny-other embeddings"):
        compose_classifier(store, name="bad", encoder=refs["encoder"], slide_head=other,
                           detector=refs["cell_detector"])  # fmt: skip
    with pytest.raises(CCSError, match="not a cell detector"):
        compose_classifier(store, name="bad", encoder=refs["encoder"],
                           slide_head=refs["slide_head"], detector=refs["encoder"])  # fmt: skip
    assert "bad" not in store.list_dirs("models")


SMART = AdaptConfig(method="smartccs", smartccs=SmartCCSAdaptConfig(lr=1e-3, min_confidence=0))


def test_smartccs_adapts_the_meanmil_head_against_the_imported_bank(tmp_path, release):
    store = Store(StoreConfig(uri=str(tmp_path / "store")))
    refs = imported(store, release)
    clf = SlideClassifier(store, store_ref(refs["classifier"]))
    views = clf.head.prototype_views(torch.ones(1), torch.ones(1))
    assert views is not None and views[0].shape[0] == 3 * len(GRADES)
    student, teacher = copy.deepcopy(clf.head), copy.deepcopy(clf.head)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    stats = adapt_step(student, teacher, _bags(6, DIM, 4, seed=1), SMART)
    assert stats["reliable"] == 6 and np.isfinite(stats["loss"]) and stats["nce"] > 0
    moved = relative_drift(dict(student.named_parameters()), before)
    assert 0 < relative_drift(dict(teacher.named_parameters()), before) < moved * 0.01
    probs, label, _ = CenterAdapter(store, clf, "c1", SMART).adapt("b1", _bags(4, DIM, 4, 2))
    assert probs.shape == (4, len(GRADES)) and label.startswith("smartccs:adapt-c1/")
    assert np.allclose(predict(clf.head, _bags(2, DIM, 4, 3)).sum(1), 1, atol=1e-5)
