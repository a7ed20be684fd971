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
    assert (report["vendor"], report["mpp"], report["mpp_source"]) == ("dicom", 0.25, "manifest")


def test_inspect_text_report_names_the_essentials(tmp_path: Path):
    path = write_disc_slide(tmp_path / "s.svs", fmt="svs", mpp=0.25)
    res = run_ccs("inspect", str(path))
    assert res.returncode == 0, res.stderr
    for word in ("aperio", "0.25", "1024", "tiles"):
        assert word in res.stdout, (word, res.stdout)


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
