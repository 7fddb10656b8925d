"""Shards of a slide list: deterministic round-robin cuts (:func:`shard_entries`), each writing
its own ``predictions.shard-i-of-K.csv`` and manifest, and :func:`merge_outputs`, which
combines them into the run's ``predictions.csv`` and ``manifest.json``.

Each shard writes only its own files and its own slides' ``OUT/<id>.zarr`` and ``OUT/<id>/``: a
slide belongs to exactly one shard, so no two array tasks ever write the same path.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from wsi_prune._files import write_text_atomic
from wsi_prune.errors import ConfigError, OutputConflict, ShardsMissing

_logger = logging.getLogger(__name__)

T = TypeVar("T")
_SHARD_RE = re.compile(r"^(predictions|manifest)\.shard-(\d+)-of-(\d+)\.(csv|json)$")


def _entry_key(entry: Any) -> str:
    return str(getattr(entry, "id", entry))


def shard_entries(entries: Sequence[T], i: int, k: int) -> list[T]:
    """The ``i``-th of ``k`` shards (0-based) of a slide list.

    Entries are sorted by id (a :class:`~wsi_prune.pipeline.inputs.SlideEntry`'s ``id``, else
    ``str(entry)``) and dealt round-robin, so every shard of a list gets the same slides on any
    machine whatever order the inputs were listed in, and sizes differ by at most one.
    """
    check_shard(i, k)
    return sorted(entries, key=_entry_key)[i::k]


def check_shard(i: int, k: int) -> None:
    if not (isinstance(i, int) and isinstance(k, int) and k >= 1 and 0 <= i < k):
        raise ConfigError(f"bad shard {i}/{k}: need 0 <= i < K and K >= 1")


def shard_suffix(i: int, k: int) -> str:
    """``".shard-2-of-8"``: what a shard inserts before a run file's extension."""
    check_shard(i, k)
    return f".shard-{i}-of-{k}"


def shard_paths(out: str | os.PathLike[str], i: int, k: int) -> tuple[Path, Path]:
    """``(OUT/predictions.shard-i-of-K.csv, OUT/manifest.shard-i-of-K.json)``."""
    s = shard_suffix(i, k)
    return Path(out) / f"predictions{s}.csv", Path(out) / f"manifest{s}.json"


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge_outputs` wrote.

    Attributes:
        predictions / manifest: the merged files.
        shards: K.
        merged: shard indices whose results were merged.
        missing: shard indices without results (only non-empty with ``partial=True``).
        rows: slides in ``predictions.csv``; ``statuses`` counts them by status.
    """

    predictions: Path
    manifest: Path
    shards: int
    merged: tuple[int, ...]
    missing: tuple[int, ...]
    rows: int
    statuses: dict[str, int]


def find_shards(out: str | os.PathLike[str]) -> dict[int, dict[int, dict[str, Path]]]:
    """Shard files in ``out``: ``{K: {i: {"predictions": path, "manifest": path}}}``."""
    found: dict[int, dict[int, dict[str, Path]]] = {}
    for p in sorted(Path(out).iterdir()):
        m = _SHARD_RE.match(p.name)
        if m and p.is_file():
            kind, i, k = m.group(1), int(m.group(2)), int(m.group(3))
            found.setdefault(k, {}).setdefault(i, {})[kind] = p
    return found


def merge_outputs(out: str | os.PathLike[str], shards: int | None = None, partial: bool = False
                  ) -> MergeResult:
    """Combine ``predictions.shard-i-of-K.csv`` into ``predictions.csv`` and the shard
    manifests into ``manifest.json`` (both written atomically; shard files are kept).

    A shard counts as present when both its CSV and its manifest exist (a shard writes its
    manifest last). Rows are sorted by slide id, the order the shards were cut in.

    Args:
        out: the run's output folder.
        shards: K; None: taken from the file names (which must then agree on one K).
        partial: merge what is there and record the missing shards instead of failing.

    Raises:
        ShardsMissing: some of the K shards are missing (lists them), unless ``partial``.
        OutputConflict: files of several K, shards run with different configs, a slide in two
            shards, or shard CSVs with different columns.
    """
    out = Path(out)
    if not out.is_dir():
        raise ShardsMissing("output folder does not exist", out)
    found = find_shards(out)
    if shards is None:
        if not found:
            raise ShardsMissing("no predictions.shard-*-of-*.csv here: nothing to merge", out)
        if len(found) > 1:
            raise OutputConflict(
                f"shard files of several runs (K = {', '.join(map(str, sorted(found)))}); "
                "remove the stale ones or pass the shard count", out)
        shards = next(iter(found))
    files = found.get(shards, {})
    present = sorted(i for i, f in files.items() if len(f) == 2)
    missing = [i for i in range(shards) if i not in present]
    if missing and not partial:
        raise ShardsMissing(
            f"{len(missing)} of {shards} shards have no results yet: "
            + ", ".join(_describe_missing(i, shards, files.get(i, {})) for i in missing)
            + " (rerun them, or merge with --partial)", out)
    if not present:
        raise ShardsMissing(f"none of the {shards} shards has results", out)

    header, rows = _read_shard_rows(out, [files[i]["predictions"] for i in present])
    manifests = [json.loads(files[i]["manifest"].read_text(encoding="utf-8")) for i in present]
    hashes = {m.get("config_hash") for m in manifests}
    if len(hashes) > 1:
        raise OutputConflict(f"shards ran with different configs ({len(hashes)} config hashes)",
                             out)
    # same config, but weight files that changed between shards (retrained at the same path)
    run_hashes = {m.get("run_hash") for m in manifests}
    if len(run_hashes) > 1:
        raise OutputConflict(f"shards ran with different weights ({len(run_hashes)} run "
                             "hashes for one config)", out)
    rows.sort(key=lambda r: r["id"])

    pred_path, man_path = out / "predictions.csv", out / "manifest.json"

    write_text_atomic(pred_path, _csv_text(header, rows))
    manifest = _merge_manifests(manifests, shards, present, missing)
    write_text_atomic(man_path, json.dumps(manifest, indent=2, default=str))
    statuses = dict(collections.Counter(r.get("status", "") for r in rows))
    _logger.info("merged %d of %d shards: %d slides %s -> %s", len(present), shards, len(rows),
                 statuses, pred_path)
    return MergeResult(pred_path, man_path, shards, tuple(present), tuple(missing), len(rows),
                       statuses)


def _describe_missing(i: int, k: int, have: dict[str, Path]) -> str:
    if "predictions" in have:
        return f"{i} (manifest.shard-{i}-of-{k}.json missing: still running or killed?)"
    return f"{i}"


def _read_shard_rows(out: Path, paths: list[Path]) -> tuple[list[str], list[dict[str, str]]]:
    header: list[str] | None = None
    rows: list[dict[str, str]] = []
    owner: dict[str, str] = {}
    for p in paths:
        with open(p, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            cols = list(reader.fieldnames or [])
            if "id" not in cols:
                raise OutputConflict("shard CSV has no 'id' column", p)
            if header is None:
                header = cols
            elif cols != header:
                raise OutputConflict(f"columns differ from {paths[0].name}", p)
            for row in reader:
                if row["id"] in owner:
                    raise OutputConflict(
                        f"slide {row['id']!r} is in both {owner[row['id']]} and {p.name}", out)
                owner[row["id"]] = p.name
                rows.append(row)
    return header or ["id"], rows


def _csv_text(header: list[str], rows: list[dict[str, str]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _merge_manifests(manifests: list[dict[str, Any]], k: int, present: list[int],
                     missing: list[int]) -> dict[str, Any]:
    first = manifests[0]
    slides: dict[str, Any] = {}
    for m in manifests:
        slides.update(m.get("slides") or {})
    merged = {key: first.get(key)
              for key in ("config", "config_hash", "run_hash", "versions", "models")}
    # a shard whose slides were all skipped loaded no models; take the first that did
    merged["models"] = next((m["models"] for m in manifests if m.get("models")), None)
    starts = [m["started"] for m in manifests if m.get("started")]
    ends = [m["finished"] for m in manifests if m.get("finished")]
    merged.update(
        started=min(starts) if starts else None,
        finished=max(ends) if ends else None,
        slides=dict(sorted(slides.items())),
        shards={"k": k, "merged": present, "missing": missing,
                "versions_differ": len({json.dumps(m.get("versions"), sort_keys=True)
                                        for m in manifests}) > 1},
    )
    return merged
