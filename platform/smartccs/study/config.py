"""What a study run is: cohort, arms and the training jobs' settings, with embedded defaults."""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from smartccs.adaptation.config import Method
from smartccs.jobrunner import deep_merge
from smartccs.store import StoreConfig
from smartccs.synth.profiles import abnormal_density_tag

Size = Literal["tiny", "small", "medium", "large"]


def embedded_defaults() -> dict[str, Any]:
    """The jobs' settings the demo runs with (``smartccs/study/defaults.yaml``)."""
    text = resources.files("smartccs.study").joinpath("defaults.yaml").read_text()
    return yaml.safe_load(text)


class Arm(BaseModel):
    """One column of the ablation: which detector backbone start, and whether to adapt."""

    model_config = ConfigDict(frozen=True)

    name: str
    label: str
    init: Literal["random", "pretrained"]
    adapt: Method


class StudyConfig(BaseModel):
    """``ccs demo`` and ``python -m jobs.study``: the Smart-CCS ablation on a synthetic cohort."""

    model_config = ConfigDict(extra="forbid")

    store: StoreConfig = Field(default_factory=StoreConfig.from_env)
    address: str | None = Field(default=None, description="Ray address; a local Ray if unset")
    cohort_dir: str = Field(default="./ccs-cohort", description="where slides are generated")
    centers: int = Field(
        default=5, ge=2, description="first N built-in profiles (int, int, ext, int, ext, ...)"
    )
    slides_per_center: int = Field(default=12, ge=4)
    size: Size = "tiny"
    abnormal_density_scale: float = Field(
        default=10.0,
        gt=0,
        le=100,
        description="abnormal cells per abnormal slide, times the profiles' (docs/synth.md): "
        "10 gives a 1 mm tiny slide the 20-100 of a 3 mm small one, enough for a slide "
        "classifier to rank slides by; 1 for the profiles' own density",
    )
    seed: int = Field(default=0, ge=0)
    test_fraction: float = Field(
        default=0.34, gt=0, lt=1, description="share of internal slides kept for internal test"
    )
    batch_slides: int = Field(
        default=6, ge=2, description="slides per screened batch: adaptation steps per batch"
    )
    adapt: Method = Field(default="smartccs", description="the adaptation of the w/ P&A arm")
    jobs: dict[str, Any] = Field(
        default_factory=dict,
        description="overrides of the embedded job settings: pretrain, detector, classifier, "
        "screening sections",
    )
    report_slides: int = Field(default=6, ge=0, description="slides with figures per report")

    def settings(self) -> dict[str, Any]:
        """Embedded defaults with this config's overrides."""
        return deep_merge(embedded_defaults(), self.jobs)

    @property
    def arms(self) -> list[Arm]:
        return [
            Arm(name="base", label="Base", init="random", adapt="none"),
            Arm(name="p", label="w/ P", init="pretrained", adapt="none"),
            Arm(name="pa", label="w/ P&A", init="pretrained", adapt=self.adapt),
        ]

    def study_id(self) -> str:
        """Same cohort and settings, same id: a re-run resumes the study instead of redoing it."""
        what = self.model_dump(mode="json", exclude={"store", "address", "cohort_dir"})
        what["settings"] = self.settings()
        digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:8]
        return f"study-{self.size}-c{self.centers}-n{self.slides_per_center}-s{self.seed}-{digest}"

    @property
    def _dense(self) -> str:
        # another density is another cohort: new folder and batch names, never the old slides
        return abnormal_density_tag(self.abnormal_density_scale)

    def cohort_path(self) -> Path:
        name = f"{self.size}-c{self.centers}-n{self.slides_per_center}-s{self.seed}{self._dense}"
        return Path(self.cohort_dir) / name

    def batch_tag(self) -> str:
        """Prefix of the study's uploaded batch names (``<tag>-train``, ``<tag>-test1``...)."""
        return f"{self.size}-n{self.slides_per_center}-s{self.seed}{self._dense}"
