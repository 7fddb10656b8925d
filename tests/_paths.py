"""Paths the tests share: the repository root and the real slide beside it."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SHARED_SLIDE = SHARED_DATA / "cmu-1-small-region.svs"
