"""Fixtures of the evaluation tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.evaluation._helpers import CANDIDATES, EXCL, ITC, L1, L2, row, write_run
from tests.io.test_annotations import square, write_xml


@pytest.fixture()
def dataset(tmp_path: Path) -> dict[str, Path]:
    """Labels, annotations and a run: slides a (tumour), b, c (normal), d (tumour), e failed."""
    ann = tmp_path / "annotations"
    ann.mkdir()
    write_xml(ann / "a.xml", [("Tumor", L1), ("_1", L2), ("_0", ITC), ("_2", EXCL)])
    write_xml(ann / "d.xml", [("_0", square(3000, 3000, 1600))])
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\na,Tumor\nb,Normal\nc,Normal\nd,Tumor\ne,Tumor\n")
    cands = dict(CANDIDATES, c=np.zeros((0, 3)), d=np.array([[0.4, 3500, 3500]]))
    run = write_run(tmp_path / "run", [row("a", 0.9), row("b", 0.6), row("c", 0.1),
                                       row("d", 0.7), row("e", None, "failed")], cands)
    return {"run": run, "labels": labels, "annotations": ann}
