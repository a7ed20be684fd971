"""Test-time adaptation: the reference method on the MIL head, tent on the detector's norms,
per-center state versioned in the store, its guards and rollback, and the batch job's --adapt.

Real parts: the store on disk, real (tiny, random-weight) model artifacts, the shared local Ray
and OpenSlide for the engine runs. Bags in the unit tests are synthetic arrays: what is pinned
is the adaptation mechanics, not what a random model predicts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from smartccs.adaptation.adapter import CenterAdapter, LocalAdapters
from smartccs.adaptation.config import (
    AdaptConfig,
    SmartCCSAdaptConfig,
    StainAdaptConfig,
    TentAdaptConfig,
)
from smartccs.adaptation.contrastive import adapt_step, relative_drift
from smartccs.adaptation.state import (
    DetectorAdaptation,
    history,
    load_state,
    rollback,
    state_name,
)
from smartccs.adaptation.tent import entropy_loss, tent_adapt
from smartccs.errors import CCSError
from smartccs.models.artifacts import latest_version, load_card, load_model
from smartccs.models.detector import build_detector, preprocess
from smartccs.models.norms import apply_norms, norm_parameters
from smartccs.screening.bags import SlideBag
from smartccs.screening.slides import SlideClassifier
from smartccs.stain import StainStats
from smartccs.store import Store

sys.path.insert(0, str(Path(__file__).parent))
from toy_models import save_toy_models


def _bags(n: int, dim: int, k: int, seed: int, shift: float = 0.0) -> list[SlideBag]:
    rng = np.random.default_rng(seed)
    bags = []
    for i in range(n):
        emb = rng.normal(shift, 1.0, (6, k, dim)).astype(np.float32)
        aug = emb + rng.normal(0, 0.1, emb.shape).astype(np.float32)
        mask = np.zeros((6, k), bool)
        mask[:, : rng.integers(1, k + 1)] = True
        scores = (rng.random((6, k)) * mask).astype(np.float32)
        bags.append(
            SlideBag(
                "c1",
                "b",
                f"s{i}",
                emb * mask[..., None],
                scores,
                np.zeros((6, k, 4)),
                mask,
                n_tiles=4,
                tiles_read=4,
                aug_embeddings=aug * mask[..., None],
            )
        )
    return bags


@pytest.fixture
def classifier(local_store: Store) -> SlideClassifier:
    ref = save_toy_models(local_store)
    clf = SlideClassifier(local_store, ref)
    with torch.no_grad():  # a prototype bank, as jobs.finetune_classifier builds one
        clf.head.prototypes.copy_(torch.randn_like(clf.head.prototypes))
    return clf


SMART = AdaptConfig(method="smartccs", smartccs=SmartCCSAdaptConfig(lr=1e-3, min_confidence=0))


def test_smartccs_step_moves_the_student_and_the_teacher_follows_by_ema(classifier):
    import copy

    student, teacher = copy.deepcopy(classifier.head), copy.deepcopy(classifier.head)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    stats = adapt_step(student, teacher, _bags(6, classifier.dim, 5, seed=1), SMART)
    assert stats["reliable"] == 6 and np.isfinite(stats["loss"]) and stats["nce"] > 0
    moved = relative_drift(dict(student.named_parameters()), before)
    followed = relative_drift(dict(teacher.named_parameters()), before)
    assert moved > 0
    assert 0 < followed < moved * 0.01, "teacher moves by (1 - momentum) of the student's step"


def test_unreliable_slides_do_not_adapt(classifier):
    import copy

    student, teacher = copy.deepcopy(classifier.head), copy.deepcopy(classifier.head)
    strict = AdaptConfig(method="smartccs", smartccs=SmartCCSAdaptConfig(min_confidence=1.0))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    stats = adapt_step(student, teacher, _bags(4, classifier.dim, 5, seed=2), strict)
    assert stats["reliable"] == 0
    assert relative_drift(dict(student.named_parameters()), before) == 0


def test_state_is_versioned_per_center_and_carried_across_batches(local_store, classifier):
    adapter = CenterAdapter(local_store, classifier, "c1", SMART)
    probs, label, _ = adapter.adapt("b1", _bags(5, classifier.dim, 5, seed=3))
    assert probs.shape == (5, 7) and np.allclose(probs.sum(1), 1, atol=1e-5)
    v1 = latest_version(local_store, state_name("c1"))
    assert label == f"smartccs:adapt-c1/{v1}"
    adapter.adapt("b2", _bags(5, classifier.dim, 5, seed=4))
    v2 = latest_version(local_store, state_name("c1"))
    assert v2 > v1
    cards = history(local_store, "c1")
    assert [c.head["batches"] for c in cards] == [["c1/b1"], ["c1/b1", "c1/b2"]]
    assert cards[1].head["parent"] == v1 and cards[1].head["source"] == classifier.ref.model_dump()
    # a new adapter (a new run, the other door) starts where the center was left
    again = CenterAdapter(local_store, classifier, "c1", SMART)
    assert again.state.version == v2 and again.state.batches == ["c1/b1", "c1/b2"]
    # another center is untouched
    assert CenterAdapter(local_store, classifier, "c2", SMART).state.version is None


def test_a_rerun_batch_is_predicted_but_not_adapted_twice(local_store, classifier):
    adapter = CenterAdapter(local_store, classifier, "c1", SMART)
    bags = _bags(5, classifier.dim, 5, seed=5)
    first, _, _ = adapter.adapt("b1", bags)
    version = adapter.state.version
    assert adapter.prepare("b1")[1] and not adapter.prepare("b2")[1], "tent skips a seen batch"
    norms = adapter.state.norms
    second, label, stats = adapter.adapt("b1", bags, DetectorAdaptation({"x": torch.ones(1)}))
    assert adapter.state.version == version and stats == {}
    assert adapter.state.norms is norms, "a re-run keeps the state's norms"
    assert label.endswith(version)
    assert np.allclose(first, second, atol=1e-6)
    assert len(history(local_store, "c1")) == 1


def test_drift_past_the_bound_resets_the_center_to_the_source(local_store, classifier):
    tight = SMART.model_copy(update={"max_drift": 1e-9})
    adapter = CenterAdapter(local_store, classifier, "c1", tight)
    _, _, stats = adapter.adapt("b1", _bags(5, classifier.dim, 5, seed=6))
    assert stats["reset"] == 1.0 and adapter.state.resets == 1
    source = classifier.head.state_dict()
    for k, v in adapter.state.student.items():
        assert torch.equal(v, source[k])
    assert history(local_store, "c1")[-1].head["resets"] == 1


def test_rollback_restores_an_earlier_state_as_a_new_version(local_store, classifier):
    adapter = CenterAdapter(local_store, classifier, "c1", SMART)
    adapter.adapt("b1", _bags(5, classifier.dim, 5, seed=7))
    v1 = adapter.state.version
    adapter.adapt("b2", _bags(5, classifier.dim, 5, seed=8))
    v2 = adapter.state.version
    v3 = rollback(local_store, "c1", v1)
    assert v3 > v2 and latest_version(local_store, state_name("c1")) == v3
    _, w1 = load_model(local_store, state_name("c1"), v1)
    _, w3 = load_model(local_store, state_name("c1"), v3)
    assert all(torch.equal(w1[k], w3[k]) for k in w1)
    card = history(local_store, "c1")[-1]
    assert card.head["rolled_back_to"] == v1 and card.head["parent"] == v2
    adapter.refresh()  # a live adapter (a service replica) picks the rollback up
    assert adapter.state.version == v3 and adapter.state.batches == ["c1/b1"]


def test_state_from_another_classifier_is_ignored(local_store, classifier):
    CenterAdapter(local_store, classifier, "c1", SMART).adapt("b1", _bags(4, classifier.dim, 5, 9))
    newer = SlideClassifier(local_store, save_toy_models(local_store, seed=1))
    state = load_state(local_store, "c1", newer.ref, newer.head.state_dict())
    assert state.version is None and state.batches == []


def test_episodic_adaptation_saves_nothing(local_store, classifier):
    episodic = SMART.model_copy(update={"persist": False})
    adapters = LocalAdapters(local_store, classifier, episodic)
    _, label, _ = adapters.adapt("c1", "b1", _bags(4, classifier.dim, 5, seed=10), None)
    assert label == "smartccs:episodic" and history(local_store, "c1") == []


def test_smartccs_needs_the_augmented_view(local_store, classifier):
    bags = _bags(3, classifier.dim, 5, seed=11)
    for b in bags:
        b.aug_embeddings = None
    with pytest.raises(CCSError, match="augmented"):
        CenterAdapter(local_store, classifier, "c1", SMART).adapt("b1", bags)


def test_center_ids_too_long_for_a_state_name_are_refused():
    with pytest.raises(CCSError, match="cannot adapt"):
        state_name("c" * 60)


def test_tent_sharpens_the_detector_and_touches_only_norm_layers(local_store):
    save_toy_models(local_store)
    card, weights = load_model(local_store, "detector", "latest")
    detector = build_detector(card)
    detector.load_state_dict(weights)
    before = {k: v.clone() for k, v in detector.state_dict().items()}
    tiles = np.random.default_rng(0).integers(0, 255, (8, 128, 128, 3), dtype=np.uint8)
    x = preprocess(tiles, 64, card.normalization)
    with torch.no_grad():
        entropy_before = float(entropy_loss(detector, x, 16))
    cfg = AdaptConfig(method="tent", tent={"lr": 1e-2, "steps": 3, "batch_size": 4})
    norms, stats = tent_adapt(detector, tiles, 64, card.normalization, {}, cfg)
    with torch.no_grad():
        assert float(entropy_loss(detector, x, 16)) < entropy_before
    assert stats["reset"] == 0 and stats["tiles"] == 8 and stats["drift"] > 0
    names = set(norm_parameters(detector))
    assert set(norms) == names and names
    after = detector.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= names, "only normalisation weights and biases move"
    fresh = build_detector(card)
    fresh.load_state_dict(weights)
    apply_norms(fresh, norms)
    assert all(torch.equal(fresh.state_dict()[k], after[k]) for k in after)
    tight = cfg.model_copy(update={"max_drift": 1e-9})
    source = build_detector(card)  # tent starts from the source model and the center's norms
    source.load_state_dict(weights)
    reset, stats = tent_adapt(source, tiles, 64, card.normalization, norms, tight)
    assert stats["reset"] == 1 and all(torch.equal(reset[k], weights[k]) for k in reset)


@pytest.fixture
def two_batch_store(tiny_cohort: Path, tmp_path: Path) -> Store:
    """Each tiny-cohort center uploaded as two batches, and toy models (a fresh store per test:
    a center's state chain records every batch it has seen, whatever the method)."""
    from smartccs.upload import upload_batch

    store = Store(str(tmp_path / "store"))
    for d in sorted(p.parent for p in tiny_cohort.glob("*/manifest.json")):
        for batch in ("b1", "b2"):
            upload_batch(d, center=d.name, batch=batch, store=store, progress=False)
    save_toy_models(store)
    return store


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("method", ["smartccs", "tent"])
def test_the_batch_job_adapts_each_center_batch_by_batch(
    two_batch_store: Store, method: str, tmp_path: Path
):
    from toy_models import toy_screening

    from smartccs.engine.job import ScreenJobConfig, run_screen_job
    from smartccs.results.tables import read_table

    cfg = toy_screening(tmp_path)
    cfg = cfg.model_copy(update={"adapt": AdaptConfig(tent=TentAdaptConfig(tiles=8))})
    result = run_screen_job(
        ScreenJobConfig(store=two_batch_store.config, adapt=method, run_id=method, screening=cfg)
    )
    assert [(b.center, b.batch) for b in result.batches] == sorted(
        (c, b) for c in {b.center for b in result.batches} for b in ("b1", "b2")
    ), "a center's batches adapt in order"
    rows = read_table(two_batch_store, "slides").to_pylist()
    for center in {b.center for b in result.batches}:
        cards = history(two_batch_store, center)[-2:]
        assert [c.head["batches"][-1] for c in cards] == [f"{center}/b1", f"{center}/b2"]
        assert all(c.head["method"] == method for c in cards)
        for batch, card in zip(("b1", "b2"), cards, strict=True):
            labels = {r["adaptation"] for r in rows if (r["center"], r["batch"]) == (center, batch)}
            assert labels == {f"{method}:adapt-{center}/{card.version}"}
        _, weights = load_model(two_batch_store, state_name(center), cards[-1].version)
        has_norms = any(k.startswith("norm.") for k in weights)
        assert has_norms == (method == "tent"), "tent keeps the detector norms in the state"
    assert all(r["score"] is not None for r in rows if r["status"] != "failed")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_a_center_stained_outside_the_detectors_range_is_calibrated_and_one_inside_is_not(
    two_batch_store: Store, tmp_path: Path, capsys: pytest.CaptureFixture
):
    from toy_models import TOY_TILING, toy_screening

    from smartccs.adaptation.stain import center_calibration, stain_reference
    from smartccs.batches import resolve_batches
    from smartccs.data.tiles import StreamConfig
    from smartccs.engine.job import ScreenJobConfig, run_screen_job
    from smartccs.synth.cohort import generate_cohort
    from smartccs.upload import upload_batch

    store = two_batch_store
    # the detector's training range: the internal centers' first batches
    internal = resolve_batches(store, ["int-a/b1", "int-b/b1"])
    reference = stain_reference(store.config, internal, StreamConfig(tiling=TOY_TILING), 16)
    assert reference is not None and set(reference.centers) == {"int-a", "int-b"}
    save_toy_models(store, stain_reference=reference)  # the newest versions carry it
    ext = tmp_path / "ext"  # a warmer, stronger stain (ext-c: +28 degrees, x1.3)
    generate_cohort(ext, center_names=["ext-c"], slides_per_center=2, size="tiny", seed=3,
                    workers=1, progress=False)  # fmt: skip
    for batch in ("b1", "b2"):
        upload_batch(ext / "ext-c", center="ext-c", batch=batch, store=store, progress=False)

    cfg = toy_screening(tmp_path)
    cfg = cfg.model_copy(update={"adapt": AdaptConfig(stain=StainAdaptConfig(tiles=16))})
    run_screen_job(
        ScreenJobConfig(store=store.config, adapt="smartccs", run_id="stain", screening=cfg)
    )
    detector_card = load_card(store, "detector", "latest")
    for center in ("int-a", "int-b", "ext-c"):
        first, second = (c.head["stain"] for c in history(store, center)[-2:])
        assert second["pixels"] > first["pixels"], "each batch adds to the center's measure"
        cal = center_calibration(detector_card, StainStats.model_validate(second))
        if center.startswith("int-"):
            assert cal is None, f"{center} is inside the training range: left as it is"
        else:
            assert cal is not None and cal.hue_deg < -10 and cal.density_scale < 0.95, cal
    from smartccs.cli import main

    assert main(["adapt", "history", "ext-c", "--store", store.uri()]) == 0
    assert "stain hue" in capsys.readouterr().out, "the history shows the measured stain"
