"""``ccs`` as a user runs it: a separate process, real files, exit codes and stderr."""

import json
from pathlib import Path

import pytest
from cli import assert_one_line_error, run_ccs
from slide_factory import write_disc_slide


def test_inspect_real_aperio_file_reports_vendor_mpp_and_dimensions(openslide_fixtures: Path):
    res = run_ccs("inspect", str(openslide_fixtures / "small.svs"), "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["vendor"] == "aperio"
    assert report["mpp"] == pytest.approx(0.499, abs=0.001)
    assert (report["width"], report["height"]) == (16, 16)  # the real fixture is 16 px


def test_inspect_real_dicom_file_and_an_mpp_override(openslide_fixtures: Path):
    res = run_ccs("inspect", str(openslide_fixtures / "boxes_0.dcm"), "--mpp", "0.25", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert (report["vendor"], report["mpp"], report["mpp_source"]) == ("dicom", 0.25, "override")


def test_inspect_text_report_names_the_essentials(tmp_path: Path):
    path = write_disc_slide(tmp_path / "s.svs", fmt="svs", mpp=0.25)
    res = run_ccs("inspect", str(path))
    assert res.returncode == 0, res.stderr
    for word in ("aperio", "0.25", "1024", "tiles"):
        assert word in res.stdout, (word, res.stdout)
    # issue 27: an --mpp override was labelled "(from manifest)"
    res = run_ccs("inspect", str(path), "--mpp", "0.3")
    assert res.returncode == 0, res.stderr
    assert "0.3 µm/px (given on the command line, --mpp)" in res.stdout, res.stdout
    assert "manifest" not in res.stdout


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("zero.svs", b""),
        ("truncated.svs", None),
        ("text.svs", b"hello, not a slide\n"),
        ("picture.tiff", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64),
    ],
)
def test_inspect_broken_files_exits_non_zero_with_one_line(tmp_path: Path, name, content):
    path = tmp_path / name
    if content is None:
        good = write_disc_slide(tmp_path / "good.svs").read_bytes()
        content = good[: len(good) // 2]
    path.write_bytes(content)
    res = run_ccs("inspect", str(path))
    assert_one_line_error(res, name)
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_inspect_real_unopenable_vendor_fixture(openslide_fixtures: Path):
    assert_one_line_error(
        run_ccs("inspect", str(openslide_fixtures / "unopenable.tiff")), "unopenable.tiff"
    )


def test_inspect_missing_file_and_missing_mpp(tmp_path: Path):
    assert_one_line_error(run_ccs("inspect", str(tmp_path / "nope.svs")), "nope.svs")
    path = write_disc_slide(tmp_path / "nompp.tiff", fmt="tiff", mpp=None)
    assert_one_line_error(run_ccs("inspect", str(path)), "nompp.tiff", "mpp")


def test_usage_errors_exit_2():
    assert run_ccs("upload").returncode == 2
    assert run_ccs("no-such-command").returncode == 2


def test_token_is_alone_on_stdout_or_json_and_its_digest_is_the_config_entry():
    """Issue 27: ``TOKEN=$(ccs token X)`` captured prose. stdout holds the token alone (the
    config entry goes to stderr), and ``--json`` gives center, token and digest."""
    from smartccs.service.auth import TokenBook, token_digest

    res = run_ccs("token", "hospital-a")
    assert res.returncode == 0, res.stderr
    token = res.stdout.removesuffix("\n")
    assert token and token.split() == [token] and "\n" not in token, res.stdout
    assert f"hospital-a: {token_digest(token)}" in res.stderr
    assert token not in res.stderr
    res = run_ccs("token", "hospital-a", "--json")
    assert res.returncode == 0 and res.stderr == "", res.stderr
    body = json.loads(res.stdout)
    assert set(body) == {"center", "token", "digest"} and body["center"] == "hospital-a"
    assert TokenBook({"hospital-a": body["digest"]}).center_of(body["token"]) == "hospital-a"
    assert_one_line_error(run_ccs("token", "../x"), "center")


@pytest.mark.parametrize(
    ("model", "says"),
    [
        ("classifier", "no classifier 'classifier' to load from"),
        ("classifier-pretrained/v1", "no classifier 'classifier-pretrained/v1' to load from"),
        ("detector-pretrained", "detector-pretrained/"),
    ],
)
def test_screen_checks_its_model_before_ray_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, model: str, says: str
):
    """Issue 27: a bad ``--model`` was reported only after Ray had started. A model missing
    from the store, or one that is not a classifier, is one line naming it and the store
    (and the classifiers it holds), and Ray is never started."""
    import hashlib

    from smartccs import cli, raycluster
    from smartccs.batches import commit_batch
    from smartccs.manifest import Manifest, SlideEntry
    from smartccs.models.artifacts import Architecture, ModelCard, save_model
    from smartccs.slide.tiling import TilingConfig
    from smartccs.store import Store, StoreConfig

    store = Store(StoreConfig(uri=str(tmp_path / "store")))
    for name, task in (
        ("classifier-pretrained", "classifier"),
        ("detector-pretrained", "detector"),
    ):
        card = ModelCard(name=name, architecture=Architecture(timm_name="toy"), task=task,
                         tiling=TilingConfig(), synthetic=True)  # fmt: skip
        save_model(store, card, {})
    store.write_bytes("incoming/c1/b1/s1.svs", b"not read")
    entry = SlideEntry(slide_id="s1", path="s1.svs", bytes=8,
                       sha256=hashlib.sha256(b"not read").hexdigest())  # fmt: skip
    commit_batch(store, Manifest(center="c1", batch="b1", slides=[entry]))
    monkeypatch.setattr(raycluster, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    code = cli.main(["screen", "--batch", "c1/b1", "--model", model, "--store", store.root])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("ccs: error: ") and len(err.splitlines()) == 1, err
    assert says in err and store.uri("models") in err, err
    assert "classifiers there: classifier-pretrained" in err, err
    if model.startswith("detector"):
        assert "is a detector, not a classifier" in err, err


def test_the_screen_job_door_checks_its_model_before_ray_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    """Issue 28: ``python -m jobs.screen`` and ``ccs screen`` are one operation with one flag
    table (``engine.flags``) and one check before Ray (``engine.job.check_screen_job``)."""
    import sys

    from smartccs import raycluster
    from smartccs.store import Store, StoreConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from jobs import screen

    store = Store(StoreConfig(uri=str(tmp_path / "store")))
    monkeypatch.setattr(raycluster, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    code = screen.main(["--batch", "c1/b1", "--model", "nope", "--store", store.root])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("jobs.screen: ") and "nope" in err, err


def test_a_nested_flag_replaces_its_field_and_keeps_the_config_s_others(tmp_path: Path):
    from smartccs import cli
    from smartccs.engine.flags import SCREEN_FLAGS
    from smartccs.engine.job import ScreenJobConfig
    from smartccs.jobrunner import flag_overrides, load_config

    config = tmp_path / "screen.yaml"
    config.write_text("screening:\n  adequacy: {preparation_diameter_mm: 13}\n")
    args = cli.build_parser().parse_args(
        ["screen", "--batch", "a/b", "--min-squamous", "7", "--adapt", "tent"]
    )
    cfg = load_config(ScreenJobConfig, config, None, flag_overrides(args, SCREEN_FLAGS))
    assert cfg.batches == ["a/b"] and cfg.adapt == "tent"
    assert cfg.screening.adequacy.min_squamous == 7
    assert cfg.screening.adequacy.preparation_diameter_mm == 13
