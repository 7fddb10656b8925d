"""A batch's inputs: slide files, folders (searched recursively by slide extension) and CSV
slide lists, expanded into :class:`SlideEntry` objects with unique, filesystem-safe ids.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from wsi_prune._ids import safe_id
from wsi_prune.errors import ConfigError
from wsi_prune.io.labels import parse_label
from wsi_prune.io.slide import IMAGE_EXTENSIONS, SLIDE_EXTENSIONS


@dataclass(frozen=True)
class SlideEntry:
    """One slide of a batch.

    Attributes:
        id: unique, filesystem-safe name of its outputs (``OUT/<id>.zarr``, ``OUT/<id>/``).
        path: the slide file.
        mpp: user MPP override for this slide (µm/px), or None.
        label: reference label from a slide list (0/1), or None.
    """

    id: str
    path: Path
    mpp: float | None = None
    label: int | None = None


def discover(
    inputs: Iterable[str | os.PathLike[str]], mpp: float | None = None
) -> list[SlideEntry]:
    """Expand slide files, folders (recursive, by slide extension) and CSV slide lists.

    A CSV list has a ``path`` column (relative paths are relative to the CSV) and optional
    ``id``, ``mpp`` and ``label`` columns. Ids are made unique with ``-2``, ``-3``...

    Raises:
        ConfigError: an input that does not exist, or a CSV without a ``path`` column.
    """
    raw: list[tuple[Path, str | None, float | None, int | None]] = []
    exts = tuple(SLIDE_EXTENSIONS) + tuple(IMAGE_EXTENSIONS) if mpp else tuple(SLIDE_EXTENSIONS)
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in exts
                           and not f.name.startswith("."))
            raw.extend((f, None, None, None) for f in found)
        elif p.suffix.lower() == ".csv" and p.is_file():
            raw.extend(_read_slide_list(p))
        elif p.exists() or p.suffix:  # a missing file is a failed slide, not a usage error
            raw.append((p, None, None, None))
        else:
            raise ConfigError("input is neither a slide, a folder nor a CSV slide list", p)
    entries, seen = [], set()
    for path, given_id, row_mpp, label in raw:
        base = safe_id(given_id or path.stem)
        sid, k = base, 2
        while sid.lower() in seen:
            sid, k = f"{base}-{k}", k + 1
        seen.add(sid.lower())
        entries.append(SlideEntry(sid, path, row_mpp if row_mpp is not None else mpp, label))
    return entries


def _read_slide_list(path: Path) -> list[tuple[Path, str | None, float | None, int | None]]:

    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "path" not in reader.fieldnames:
            raise ConfigError("slide list needs a 'path' column", path)
        for i, row in enumerate(reader, start=2):
            p = Path(row["path"])
            if not p.is_absolute():
                p = path.parent / p
            try:
                row_mpp = float(row["mpp"]) if row.get("mpp") else None
                label = parse_label(row["label"]) if row.get("label") else None
            except ValueError as exc:
                raise ConfigError(f"line {i}: {exc}", path) from exc
            rows.append((p, row.get("id") or None, row_mpp, label))
    return rows
