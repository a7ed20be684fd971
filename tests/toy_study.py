"""The main job (``ccs demo``) at toy size: its code path end to end on a tiny cohort, with the
training stages found finished in the study's state, as a resumed study finds them.

A full study trains five models (minutes even at a few steps; training is covered by
test_pretrain.py and test_finetune_jobs.py), so the state names tiny random-weight models
(toy_models.py) saved under the names the demo's training gives them. Everything else is the
production path: real synthetic slides, uploads, the screening engine with and without
adaptation, evaluation, figures, and what the study publishes at the store's top level.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from toy_models import save_toy_models, toy_screening

from smartccs import layout
from smartccs.models.artifacts import load_card
from smartccs.store import Store, StoreConfig
from smartccs.study.config import StudyConfig
from smartccs.study.run import StudyResult, StudyState, run_study
from smartccs.synth.cohort import generate_cohort

DEMO_MODELS = {
    "random": ("detector-random-backbone", "detector-random", "classifier-random"),
    "pretrained": ("encoder", "detector-pretrained", "classifier-pretrained"),
}
"""(encoder, detector, classifier) per detector start, named as the demo's training names them:
Base embeds cells with its detector's own backbone, the pretrained arms with ``encoder``."""


def toy_cohort(root: Path) -> Path:
    """Two internal centers and one external (the built-in order), 4 tiny slides each."""
    cfg = StudyConfig(cohort_dir=str(root), centers=3, slides_per_center=4)
    generate_cohort(
        cfg.cohort_path(), centers=3, slides_per_center=4, size="tiny", seed=0, workers=2,
        progress=False, abnormal_density_scale=cfg.abnormal_density_scale,
    )  # fmt: skip
    return root


def toy_study_config(store_uri: str, cohort_dir: Path, tmp: Path) -> StudyConfig:
    """The demo's config at toy size: the toy cohort, batches of 2 slides, toy screening."""
    screening = toy_screening(tmp).model_dump(mode="json", exclude={"adapt"})
    return StudyConfig(
        store=StoreConfig(uri=store_uri),
        cohort_dir=str(cohort_dir),
        centers=3,
        slides_per_center=4,
        batch_slides=2,
        report_slides=1,
        jobs={"screening": screening},
    )


def trained_state(store: Store) -> StudyState:
    """What a study whose training stages finished holds: models per init (toy weights)."""
    state = StudyState()
    for seed, (init, names) in enumerate(DEMO_MODELS.items()):
        ref = save_toy_models(store, seed=seed, names=names)
        card = load_card(store, ref.name, ref.version)
        if init == "pretrained":
            state.encoder = card.head["encoder"]["version"]
        state.detectors[init] = card.head["detector"]["version"]
        state.classifiers[init] = ref.version
    return state


def run_toy_study(cfg: StudyConfig) -> StudyResult:
    """Seed the trained state (once) and run the study on the Ray already joined."""
    store = Store(cfg.store)
    state_key = f"{layout.run(cfg.study_id())}/state.json"
    if not store.exists(state_key):
        store.write_bytes(state_key, trained_state(store).model_dump_json().encode())
    return run_study(cfg)


@dataclass(frozen=True)
class ToyDemo:
    """The toy study as ``make demo`` would leave it: its cohort, config and first result."""

    cohort: Path
    config: StudyConfig
    result: StudyResult

    @property
    def store_dir(self) -> Path:
        return Path(self.config.store.uri)


@pytest.fixture(scope="session")
def toy_demo_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return toy_cohort(tmp_path_factory.mktemp("toy-demo-cohort"))


@pytest.fixture(scope="session")
def toy_demo(
    ray_session: str, toy_demo_cohort: Path, tmp_path_factory: pytest.TempPathFactory
) -> ToyDemo:
    """The toy study, run once per session (a minute on 2 cores): test_study.py checks what it
    made, test_readme.py tours a copy of its store as the README's ``./ccs-data``."""
    root = tmp_path_factory.mktemp("toy-demo")
    cfg = toy_study_config(str(root / "store"), toy_demo_cohort, root)
    return ToyDemo(toy_demo_cohort, cfg, run_toy_study(cfg))
