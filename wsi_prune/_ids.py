"""Slide ids: how a slide file, a store, a label-file cell or an annotation file is named, and
how ids are matched. One place, so outputs, labels and annotations always agree.

A leaf module (standard library only).
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

#: Longest id in UTF-8 bytes: ``.<id>.zarr.lock.<token>.tmp`` must stay under the 255 bytes
#: a file name may have.
MAX_ID_BYTES = 120
# Kept as they are: letters and digits of any script, their combining marks, and ``._-``.
_KEEP_CATEGORIES = ("L", "N", "M")
# Dropped: invisible joiners and variation selectors (emoji presentation), and non-ASCII
# modifier symbols (emoji skin tones).
_VARIATION_SELECTORS = range(0xFE00, 0xFE10)


def _dropped(ch: str, cat: str) -> bool:
    return cat == "Cf" or ord(ch) in _VARIATION_SELECTORS or (cat == "Sk" and ord(ch) > 0x7F)
# Suffixes dropped from a label-file cell or annotation file name to get the slide id.
_SLIDE_SUFFIXES = frozenset({".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms",
                             ".zip", ".xml"})  # fmt: skip


def safe_id(name: str) -> str:
    """A filesystem-safe, readable id: never empty, never hidden, never ``..``, so
    ``OUT/<id>`` stays inside OUT.

    Letters and digits of every script are kept (``tumör_01``, ``切片_3``); a symbol such as an
    emoji becomes its Unicode name (``😐`` → ``neutral-face``), so a name made only of symbols
    stays readable and distinct; anything else (spaces, punctuation, path separators) becomes
    ``_``. The name is NFC-normalised first (macOS file names arrive decomposed) and the id
    cut at :data:`MAX_ID_BYTES` UTF-8 bytes.
    """
    parts: list[str] = []
    for ch in unicodedata.normalize("NFC", name):
        cat = unicodedata.category(ch)
        if _dropped(ch, cat):
            continue
        if ch in "._-" or cat[0] in _KEEP_CATEGORIES:
            parts.append(ch)
        elif cat == "So" and unicodedata.name(ch, ""):
            parts.append("_" + unicodedata.name(ch).lower().replace(" ", "-") + "_")
        else:
            parts.append("_")
    sid = re.sub(r"_{2,}", "_", "".join(parts)).strip("._") or "slide"
    raw = sid.encode("utf-8")[:MAX_ID_BYTES]
    return raw.decode("utf-8", errors="ignore").rstrip("._") or "slide"


def unique_ids(bases: Sequence[str], paths: Sequence[str | os.PathLike[str]],
               qualify: Sequence[bool] | None = None) -> list[str]:
    """Make ids unique within a run, the same way on every machine and in every shard.

    Rule: ids are compared case-insensitively (OUT may be on a case-insensitive filesystem,
    where ``A.zarr`` and ``a.zarr`` are one folder). Where several slides share an id, each
    one that may be qualified gets its nearest parent folders, as many as tell them apart
    (``sub1/a.svs`` and ``sub2/a.svs`` → ``sub1_a`` and ``sub2_a``). Ids still shared after
    that (``A.svs`` and ``a.svs`` in one folder, one file listed twice, an id given twice in a
    slide list) get ``-2``, ``-3``... in the order of their paths; the first keeps its id, and
    a slide's own name goes before another's qualified one.

    Args:
        bases: each slide's id before the rule (:func:`safe_id` of its name or given id).
        paths: each slide's file.
        qualify: per slide, whether folder names may be added (False for ids given in a
            slide list); default all True.

    Returns:
        One unique id per slide, in input order.
    """
    n = len(bases)
    qualify = [True] * n if qualify is None else list(qualify)
    ids = list(bases)
    qualified = [False] * n
    groups: dict[str, list[int]] = {}
    for i, b in enumerate(ids):
        groups.setdefault(b.casefold(), []).append(i)
    for members in groups.values():
        movable = [i for i in members if qualify[i]]
        if len(members) < 2 or not movable:
            continue
        parents = {i: Path(os.path.abspath(paths[i])).parent.parts[1:] for i in movable}
        depth = max(len(p) for p in parents.values())
        # candidates[k]: each slide's id with its k nearest folders (k = 0: none)
        candidates = [{i: safe_id("_".join((*parents[i][max(0, len(parents[i]) - k):],
                                            bases[i]))) if k else bases[i] for i in movable}
                      for k in range(depth + 1)]
        # the fewest folders that tell the most of them apart; none if folders do not help
        distinct = [len({v.casefold() for v in c.values()}) for c in candidates]
        best = distinct.index(max(distinct))
        for i, v in candidates[best].items():
            ids[i] = v
            qualified[i] = best > 0
    taken: set[str] = set()
    # natural ids first: a slide keeps its own name before another's qualified one takes it
    order = sorted(range(n), key=lambda i: (qualified[i], os.fspath(paths[i]), i))
    for i in order:
        sid, k = ids[i], 2
        while sid.casefold() in taken:
            sid, k = f"{ids[i]}-{k}", k + 1
        taken.add(sid.casefold())
        ids[i] = sid
    return ids


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
