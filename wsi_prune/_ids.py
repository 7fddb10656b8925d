"""Slide ids: how a slide file, a store, a label-file cell or an annotation file is named, and
how ids are matched. One place, so outputs, labels and annotations always agree.

A leaf module (standard library only).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")
# Suffixes dropped from a label-file cell or annotation file name to get the slide id.
_SLIDE_SUFFIXES = frozenset({".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms",
                             ".zip", ".xml"})  # fmt: skip


def safe_id(name: str) -> str:
    """A filesystem-safe id: letters, digits, ``.``, ``_``, ``-``; never empty, never hidden,
    never ``..``, so ``OUT/<id>`` stays inside OUT."""
    sid = _SAFE_ID.sub("_", name).strip("._") or "slide"
    return sid[:120]


def slide_key(name: str) -> str:
    """Slide id of a label-file cell: the name without folder and slide-file suffix."""
    p = Path(name.strip())
    return p.stem if p.suffix.lower() in _SLIDE_SUFFIXES else p.name


def slide_id(path: str | os.PathLike[str]) -> str:
    """Slide id of a store (``OUT/<id>.zarr``), slide or annotation file: the file name without
    its store or slide-file suffix."""
    p = Path(path)
    return p.stem if p.suffix.lower() == ".zarr" else slide_key(p.name)


def lookup_slide(table: Mapping[str, T], slide_id: str) -> T | None:
    """The entry of ``slide_id`` in a table keyed by slide id, or None.

    An exact key wins; otherwise case is ignored, because the challenges' own files disagree
    on it (CAMELYON16's ``reference.csv`` says ``Test_001`` for ``test_001.tif``). Labels,
    annotations and run ids are all matched through this one function.
    """
    if slide_id in table:
        return table[slide_id]
    key = slide_id.casefold()
    return next((v for k, v in table.items() if k.casefold() == key), None)
