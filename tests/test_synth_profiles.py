"""Center profiles: the built-ins, the YAML schema and its error messages."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from smartccs.errors import CCSError
from smartccs.synth.profiles import load_profiles
from smartccs.taxonomy import GRADES

DOC = Path(__file__).resolve().parents[1] / "docs" / "synth.md"

GOOD = """
centers:
  - name: lab-1
    kind: external
    scanner: {mpp: 0.5, format: tiff}
    prevalence: {NILM: 0.7, HSIL: 0.3}
"""


def test_builtins_have_internal_and_external_centers_interleaved() -> None:
    profiles = load_profiles(None)
    kinds = [p.kind for p in profiles]
    assert kinds.count("internal") >= 4
    assert 2 <= kinds.count("external") <= 3
    assert kinds[:3] == ["internal", "internal", "external"]  # --centers 3 mixes kinds
    assert len({p.name for p in profiles}) == len(profiles)
    for p in profiles:
        assert set(p.prevalence) == set(GRADES)
        assert sum(p.prevalence.values()) == pytest.approx(1.0)


def test_external_centers_shift_scanner_and_stain() -> None:
    profiles = load_profiles(None)
    internal = [p for p in profiles if p.kind == "internal"]
    external = [p for p in profiles if p.kind == "external"]
    internal_mpp = {p.scanner.mpp for p in internal}
    assert any(p.scanner.mpp not in internal_mpp for p in external)
    assert max(abs(p.stain.hue_shift_deg) for p in external) > 3 * max(
        abs(p.stain.hue_shift_deg) for p in internal
    )
    assert min(p.scanner.jpeg_quality for p in external) < min(
        p.scanner.jpeg_quality for p in internal
    )
    assert {p.scanner.format for p in profiles} == {"svs", "tiff"}


def test_minimal_profile_gets_documented_defaults(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(GOOD)
    (p,) = load_profiles(path)
    assert p.name == "lab-1" and p.scanner.mpp == 0.5 and p.scanner.format == "tiff"
    assert p.prevalence["LSIL"] == 0.0 and p.prevalence["HSIL"] == 0.3


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (GOOD.replace("mpp: 0.5", "mpp: -1"), "centers.0.scanner.mpp"),
        (GOOD.replace("HSIL: 0.3", "HSIL: 0.2"), "centers.0.prevalence"),
        (GOOD.replace("kind: external", "kind: elsewhere"), "centers.0.kind"),
        (GOOD.replace("format: tiff", "format: tiff, colour: red"), "centers.0.scanner.colour"),
        (GOOD.replace("name: lab-1", "name: ../up"), "centers.0.name"),
        (GOOD.replace("prevalence: {NILM", "prevalence: {CIN9: 0.0, NILM"), "centers.0.prevalence"),
        (GOOD + GOOD.replace("centers:", ""), "centers"),  # duplicate name
    ],
)
def test_bad_profile_names_file_and_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(CCSError) as err:
        load_profiles(path)
    message = str(err.value)
    assert str(path) in message
    assert field in message


def test_invalid_yaml_and_missing_file_are_ccs_errors(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("centers: [\n  - name: x\n  kind: : :\n")
    with pytest.raises(CCSError, match=r"broken\.yaml.*line"):
        load_profiles(path)
    with pytest.raises(CCSError, match="nope.yaml"):
        load_profiles(tmp_path / "nope.yaml")


def test_example_in_docs_is_a_valid_profiles_file(tmp_path: Path) -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, "docs/synth.md must show a YAML example"
    path = tmp_path / "example.yaml"
    path.write_text(blocks[0])
    assert load_profiles(path)
