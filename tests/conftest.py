"""Shared fixtures: real synthetic pyramidal slides written with tifffile, read by OpenSlide."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._paths import SHARED_SLIDE


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")
    parser.addoption("--containers", action="store_true", default=False,
                     help="run the tests marked container (build and run the docker/ images)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skips = {}
    if not config.getoption("--runslow"):
        skips["slow"] = pytest.mark.skip(reason="slow: run with --runslow")
    if not config.getoption("--containers"):
        skips["container"] = pytest.mark.skip(
            reason="container: run with --containers (.ci/run adds it when podman works and "
                   "the image's deps stage is built: docker/README.md)")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def real_slide() -> Path:
    """The real Aperio H&E slide in ../shared/data (20x, 0.499 µm/px, 2220x2967 px)."""
    if not SHARED_SLIDE.is_file():
        pytest.skip(f"real slide not present at {SHARED_SLIDE}")
    return SHARED_SLIDE


@pytest.fixture(scope="session")
def slide_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slides")


def _make(slide_dir: Path, name: str, **spec):
    from wsi_prune.synth import SynthSpec, write_slide

    path = slide_dir / name
    if not path.exists():
        write_slide(path, SynthSpec(**spec))
    return path


@pytest.fixture(scope="session")
def svs_slide(slide_dir: Path) -> Path:
    """Aperio-style SVS, 4096² px at 0.5 µm/px, with tumour."""
    return _make(slide_dir, "synth.svs", width=4096, height=4096, mpp=0.5, flavour="svs",
                 seed=1, tumour=True)


@pytest.fixture(scope="session")
def tiff_slide(slide_dir: Path) -> Path:
    """Generic pyramidal TIFF with resolution tags, 3072x2560 px at 0.25 µm/px."""
    return _make(slide_dir, "synth.tiff", width=3072, height=2560, mpp=0.25, flavour="tiff",
                 seed=2, tumour=False)


@pytest.fixture(scope="session")
def nompp_slide(slide_dir: Path) -> Path:
    """Generic pyramidal TIFF without any resolution metadata."""
    return _make(slide_dir, "nompp.tif", width=2048, height=2048, mpp=0.5,
                 flavour="tiff-nompp", seed=3, tumour=False)


@pytest.fixture(scope="session")
def svs_nompp_slide(slide_dir: Path) -> Path:
    """Aperio-style SVS with AppMag = 20 but no MPP: only the objective power gives 0.5 µm/px."""
    return _make(slide_dir, "appmag_only.svs", width=2048, height=2048, mpp=0.5,
                 flavour="svs-nompp", seed=4, tumour=False)
