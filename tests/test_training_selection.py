"""Which batches the training jobs learn from, and their split check, before Ray starts.

The store is real (a local folder) with committed batches whose "slides" are a few bytes: the
checks read manifests and annotation markers only, never a pixel. The jobs run through their
own ``main`` (argument parser, config loading, ``check``) with Ray's start replaced by a
tripwire, so a test fails if a job gets as far as Ray before refusing.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import re
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from smartccs import layout
from smartccs.batches import BatchRef, commit_batch
from smartccs.errors import CCSError
from smartccs.labels import LabelsError, put_cell_labels
from smartccs.manifest import Manifest, SlideEntry
from smartccs.splits import SplitConfig, split_rows
from smartccs.store import Store
from smartccs.train.selection import (
    check_splits,
    graded_batches,
    labelled_batches,
    split_counts,
)

REPO = Path(__file__).resolve().parents[1]


def _manifest(center: str, batch: str, grades: list[str | None]) -> Manifest:
    slides = [
        SlideEntry(
            slide_id=f"s{i}",
            path=f"s{i}.svs",
            sha256=hashlib.sha256(f"{center}{batch}{i}".encode()).hexdigest(),
            bytes=len(f"{center}{batch}{i}"),
            grade=g,
        )
        for i, g in enumerate(grades)
    ]
    return Manifest(center=center, batch=batch, slides=slides)


def put(store: Store, center: str, batch: str, grades: list[str | None], labelled: bool) -> None:
    """A committed batch of tiny stand-in slides, with cell annotations when ``labelled``."""
    manifest = _manifest(center, batch, grades)
    for i, s in enumerate(manifest.slides):
        store.write_bytes(
            f"{layout.incoming(center, batch)}/{s.path}", f"{center}{batch}{i}".encode()
        )
    ref = commit_batch(store, manifest)
    if labelled:
        cells = {"slide_id": ["s0"], "class": ["HSIL"], "x0": [1], "y0": [1], "x1": [9], "y1": [9]}
        put_cell_labels(store, ref, pa.table(cells))


# three centers of 2 NILM + 1 HSIL slides each: every stratum holds 1 or 2 slides, so a test
# fraction of 0.25 rounds to no test slide at all (the "got 9 and 0")
SMALL = ["NILM", "NILM", "HSIL"]


@pytest.fixture
def store(local_store: Store) -> Store:
    for center in ("int-a", "int-b", "int-c"):
        put(local_store, center, "train", SMALL, labelled=True)
    put(local_store, "int-a", "scans", SMALL, labelled=False)  # no annotations yet
    put(local_store, "ext-a", "test1", ["NILM", None, "LSIL"], labelled=True)  # one ungraded
    return local_store


def ids(refs: list[BatchRef]) -> list[str]:
    return [f"{r.center}/{r.batch}" for r in refs]


# --- batches ----------------------------------------------------------------------------------


def test_every_batch_means_every_annotated_one_and_the_rest_are_named_as_skipped(store, caplog):
    with caplog.at_level(logging.INFO, logger="smartccs"):
        refs = labelled_batches(store, [], exclude=["ext-a/test1"])
    assert sorted(ids(refs)) == ["int-a/train", "int-b/train", "int-c/train"]
    (line,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert "skipped 1: int-a/scans (no cell annotations)" in line, line


def test_a_named_batch_without_annotations_is_refused_naming_it(store):
    with pytest.raises(LabelsError, match=r"int-a/scans: no cell annotations .*ccs labels"):
        labelled_batches(store, ["int-a/train", "int-a/scans"])


def test_no_annotated_batch_at_all_says_how_to_publish(local_store):
    put(local_store, "int-a", "scans", SMALL, labelled=False)
    with pytest.raises(LabelsError, match=r"none of the 1 committed batches .*ccs labels"):
        labelled_batches(local_store, [])


def test_the_classifier_takes_batches_graded_throughout(store, caplog):
    with caplog.at_level(logging.INFO, logger="smartccs"):
        refs = graded_batches(store, [])
    assert "ext-a/test1" not in ids(refs) and len(refs) == 4
    assert any(
        "ext-a/test1 (1 of 3 slides without a grade)" in r.getMessage() for r in caplog.records
    )
    with pytest.raises(CCSError, match=r"ext-a/test1.*1 of 3 slides without a grade"):
        graded_batches(store, ["ext-a/test1"])


# --- splits -----------------------------------------------------------------------------------


def test_an_empty_split_says_how_many_slides_each_gets_and_which_fraction_fixes_it(store):
    refs = labelled_batches(store, [], exclude=["ext-a/test1"])
    split = SplitConfig(val=0.2, test=0.25)
    with pytest.raises(CCSError) as exc:
        check_splits(refs, split, ("train", "test"), "detector run 'x'")
    message = str(exc.value)
    assert "\n" not in message
    assert "the test split would be empty: 9 slides" in message
    assert "train 9, val 0, test 0" in message and "strata of 1-2 slides" in message
    fix = dict(re.findall(r"split\.(val|test) to ([\d.]+)", message.split("; set ")[1]))
    assert fix == {"test": "0.3"}, message
    fixed = split_rows(refs, split.model_copy(update={"test": float(fix["test"])}))
    assert fixed["train"] and fixed["test"], "the suggested fraction fills the splits"


def test_too_few_slides_for_any_fraction_says_add_slides(local_store):
    put(local_store, "int-a", "one", ["HSIL"], labelled=True)
    refs = labelled_batches(local_store, [])
    with pytest.raises(CCSError, match="no split fractions fill train, test: add slides"):
        check_splits(refs, SplitConfig(), ("train", "test"), "detector run 'x'")


@given(
    sizes=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 7)), min_size=1, max_size=4),
    val=st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.34]),
    test=st.sampled_from([0.0, 0.15, 0.25, 0.3, 0.5]),
)
def test_split_counts_are_what_split_rows_cuts(sizes, val, test):
    refs = []
    for c, (normal, abnormal) in enumerate(sizes):
        grades = ["NILM"] * normal + ["HSIL"] * abnormal
        if grades:
            m = _manifest(f"c{c}", "b1", grades)
            refs.append(BatchRef(center=m.center, batch=m.batch, prefix="p", manifest=m))
    if not refs:
        return
    from collections import Counter

    cfg = SplitConfig(val=val, test=test)
    strata = Counter(
        Counter((r.center, s.grade != "NILM") for r in refs for s in r.manifest.slides).values()
    )
    rows = split_rows(refs, cfg)
    assert split_counts(strata, val, test) == {k: len(v) for k, v in rows.items()}


# --- the jobs, up to where Ray would start ----------------------------------------------------


@pytest.fixture
def jobs(monkeypatch):
    """The job modules, with Ray's start a tripwire and each job's run recording its config."""
    monkeypatch.setattr(sys, "path", [*sys.path, str(REPO)])

    def no_ray(address=None):
        raise AssertionError("the job started Ray before refusing")

    monkeypatch.setattr("smartccs.raycluster.init_ray", no_ray)
    return lambda name: importlib.import_module(f"jobs.{name}")


def _config(tmp_path: Path, store: Store, **fields) -> Path:
    """A config file outside the repository, as a user keeps their own."""
    path = tmp_path / "elsewhere" / "my-config.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(
        yaml.safe_dump({"run_name": "mine", "store": {"uri": store.config.uri}, **fields})
    )
    return path


def _ran(monkeypatch, module, attr: str) -> dict:
    seen: dict = {}

    def run(cfg):
        seen["cfg"] = cfg
        raise CCSError("stopped after the check")  # nothing past this point is under test

    monkeypatch.setattr(module, attr, run)
    monkeypatch.setattr("smartccs.raycluster.init_ray", lambda address=None: None)
    return seen


def test_detector_job_on_its_own_store_trains_on_the_annotated_batches(
    store, jobs, tmp_path, monkeypatch, caplog
):
    job = jobs("finetune_detector")
    seen = _ran(monkeypatch, job, "finetune_detector")
    config = _config(tmp_path, store, batches=[], split={"val": 0.2, "test": 0.34})
    with caplog.at_level(logging.INFO, logger="smartccs"):
        assert job.main(["--config", str(config), "--store", store.config.uri]) == 1
    assert sorted(seen["cfg"].batches) == ["ext-a/test1", "int-a/train", "int-b/train",
                                           "int-c/train"]  # fmt: skip
    assert any("skipped 1: int-a/scans (no cell annotations)" in r.getMessage()
               for r in caplog.records)  # fmt: skip


def test_detector_job_refuses_an_empty_split_before_ray_starts(store, jobs, tmp_path, capsys):
    config = _config(tmp_path, store, batches=[])
    assert jobs("finetune_detector").main(["--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "detector run 'mine': the test split would be empty" in err
    assert "set split.test to" in err


def test_training_jobs_take_repeatable_batch_flags(store, jobs, tmp_path, monkeypatch):
    split = {"split": {"val": 0.2, "test": 0.5}}
    for name, attr, fields in [("finetune_detector", "finetune_detector", split),
                               ("finetune_classifier", "train_classifier", split),
                               ("pretrain", "pretrain", {})]:  # fmt: skip
        config = _config(tmp_path, store, batches=["ext-a/test1"], **fields)
        job = jobs(name)
        seen = _ran(monkeypatch, job, attr)
        argv = ["--config", str(config), "--batch", "int-a/train", "--batch", "int-b/train"]
        assert job.main(argv) == 1, name
        assert seen["cfg"].batches == ["int-a/train", "int-b/train"], name


def test_classifier_job_refuses_an_ungraded_batch_before_ray_starts(store, jobs, tmp_path, capsys):
    config = _config(tmp_path, store, batches=["int-a/train", "ext-a/test1"])
    assert jobs("finetune_classifier").main(["--config", str(config)]) == 1
    assert "ext-a/test1: the classifier learns from slide grades" in capsys.readouterr().err


def test_pretrain_job_refuses_an_unknown_batch_before_ray_starts(store, jobs, tmp_path, capsys):
    config = _config(tmp_path, store)
    assert jobs("pretrain").main(["--config", str(config), "--batch", "int-a/nope"]) == 1
    assert "int-a/nope" in capsys.readouterr().err


def test_a_config_can_come_from_an_environment_variable(store, jobs, monkeypatch):
    """How ``ccs submit`` ships a config from outside the working directory."""
    job = jobs("finetune_detector")
    seen = _ran(monkeypatch, job, "finetune_detector")
    raw = {"run_name": "shipped", "store": {"uri": store.config.uri}, "split": {"test": 0.5}}
    text = yaml.safe_dump(raw | {"batches": ["int-a/train", "ext-a/test1"]})
    monkeypatch.setenv("CCS_JOB_CONFIG", text)
    assert job.main(["--config", "env:CCS_JOB_CONFIG"]) == 1
    assert seen["cfg"].run_name == "shipped"
    monkeypatch.delenv("CCS_JOB_CONFIG")
    assert job.main(["--config", "env:CCS_JOB_CONFIG"]) == 1  # named but unset: one line
