"""A finished run shared by the output tests: one pruned demo run of a 2048² px tumour slide."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._paths import REPO as ROOT
from wsi_prune.config import RunConfig
from wsi_prune.pipeline.batch import run_batch
from wsi_prune.synth import SynthSpec, write_slide


@pytest.fixture(scope="session")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``OUT/small.zarr`` and ``OUT/small/`` of a pruned demo run; the slide is
    ``OUT/../small.svs``."""
    root = tmp_path_factory.mktemp("heat")
    slide = write_slide(root / "small.svs", SynthSpec(width=2048, height=2048, mpp=0.5, seed=4,
                                                      tumour=True, tissue_fraction=0.5))
    cfg = RunConfig.from_yaml(ROOT / "pipelines" / "demo.yaml")
    rows = run_batch([slide.path], root / "out", cfg, progress=False)
    assert rows[0]["status"] == "ok", rows[0]["error"]
    return root / "out"
