"""A batch's inputs: slide files, folders (searched recursively by slide extension) and CSV
slide lists, expanded into :class:`SlideEntry` objects with unique, filesystem-safe ids
(:func:`wsi_prune._ids.safe_id` and the collision rule of :func:`wsi_prune._ids.unique_ids`).

Folders are searched through symlinked sub-folders too (slide archives are often linked in),
each real folder once, so a symlink loop ends the search of that branch with a warning. A
symlink with a slide's extension that leads nowhere (broken, or a loop) is kept as a slide:
it fails with its own reason instead of vanishing from the results.

A DICOM slide is a folder of ``.dcm`` files, one per pyramid level (plus label and overview),
any of which OpenSlide opens as the whole slide. The files of one series (same folder, same
SeriesInstanceUID) are one slide: its first file by name is the one read, and its id is the
folder's name when the folder holds that series alone. A slide list may give such a folder as
a slide's path.

A Hamamatsu VMS or VMU slide is an index file naming its pieces (JPEG or NGR images, a map,
a macro image). Those pieces are parts of that slide, never slides of their own, even with
``--mpp`` (which makes plain images slides).
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from wsi_prune._ids import safe_id, unique_ids
from wsi_prune.errors import ConfigError
from wsi_prune.io.dicom import dicom_series_uid
from wsi_prune.io.labels import csv_delimiter, parse_label
from wsi_prune.io.slide import IMAGE_EXTENSIONS, SLIDE_EXTENSIONS
from wsi_prune.outputs import PICTURES, RAW_HEAT_PICTURE

_logger = logging.getLogger(__name__)

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
    inputs: Iterable[str | os.PathLike[str]], mpp: float | None = None,
    out: str | os.PathLike[str] | None = None,
) -> list[SlideEntry]:
    """Expand slide files, folders (recursive, by slide extension) and CSV slide lists.

    ``out``: the run's output folder, never searched for slides when it lies inside an input
    folder (nor is any other run's output folder: see :func:`_walk`).

    A CSV list has a ``path`` column (relative paths are relative to the CSV) and optional
    ``id``, ``mpp`` and ``label`` columns. Ids follow :func:`wsi_prune._ids.unique_ids`: a
    slide's file name (or the id given in a list), made filesystem-safe; slides sharing one
    (case-insensitively) get their nearest distinguishing folder names, then ``-2``, ``-3``.

    Raises:
        ConfigError: an input that does not exist, a folder that cannot be listed or holds no
            slide file, or a CSV without a ``path`` column.
    """
    raw: list[tuple[Path, str | None, float | None, int | None]] = []
    exts = tuple(SLIDE_EXTENSIONS) + tuple(IMAGE_EXTENSIONS) if mpp else tuple(SLIDE_EXTENSIONS)
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            if not os.access(p, os.R_OK | os.X_OK):
                raise ConfigError("folder cannot be listed (permission denied)", p)
            passed: list[Path] = []
            found = _walk(p, exts, Path(out) if out is not None else None, passed)
            if found and passed:
                # plain images carry no resolution: without --mpp they are not slides, and a
                # run that quietly left them out would look complete
                _logger.warning("%s: %d plain image(s) left out (%s%s): they carry no "
                                "resolution; pass --mpp (µm/px) to run them as slides", p,
                                len(passed), sorted(passed)[0].relative_to(p),
                                ", ..." if len(passed) > 1 else "")
            if not found:
                # an empty predictions.csv and exit 0 would read as "nothing to do"; a wrong
                # folder or a missing --mpp for plain images is the usual cause
                hint = "" if mpp else "; plain images (.png, .jpg) need --mpp"
                raise ConfigError(f"no slide files found (searched recursively for "
                                  f"{', '.join(dict.fromkeys(exts))}){hint}", p)
            raw.extend((f, None, None, None) for f in found)
        elif p.suffix.lower() == ".csv" and p.is_file():
            raw.extend(_read_slide_list(p))
        elif p.exists() or p.is_symlink() or p.suffix:
            # a missing file is a failed slide, not a usage error
            raw.append((p, None, None, None))
        else:
            raise ConfigError("input is neither a slide, a folder nor a CSV slide list", p)
    raw = _one_per_dicom_series(_without_vms_parts(raw))
    # a DICOM series named after its folder may be qualified by the folders above that one
    ids = unique_ids([safe_id(given or path.stem) for path, given, _, _ in raw],
                     [path.parent if isinstance(given, _FolderName) else path
                      for path, given, _, _ in raw],
                     [given is None or isinstance(given, _FolderName) for _, given, _, _ in raw])
    return [SlideEntry(sid, path, row_mpp if row_mpp is not None else mpp, label)
            for sid, (path, _, row_mpp, label) in zip(ids, raw, strict=True)]


def one_slide(path: str | os.PathLike[str], mpp: float | None = None) -> SlideEntry:
    """The slide a single-slide command (``info``, ``tile``) was given: a file, or a folder
    that holds exactly one slide (a DICOM series, whose files are one slide).

    Raises:
        ConfigError: a folder with no slide or with several.
    """
    p = Path(path)
    entries = discover([p], mpp)
    if len(entries) != 1:  # a file is always one entry
        names = ", ".join(str(e.path.relative_to(p)) for e in entries[:5])
        raise ConfigError(f"folder holds {len(entries)} slides ({names}"
                          f"{', ...' if len(entries) > 5 else ''}); give one slide file", p)
    return entries[0]


class _FolderName(str):
    """An id taken from a DICOM series' folder (not given by the user: it may be qualified)."""


def _one_per_dicom_series(
    raw: list[tuple[Path, str | None, float | None, int | None]],
) -> list[tuple[Path, str | None, float | None, int | None]]:
    """Keep one file of each DICOM series among the inputs without an id of their own (files
    found in folders, given on the command line, or listed without an ``id``; a listed id is
    the user's choice and stays). Its id: the folder's name when the folder holds one series
    and nothing else that reads as a slide, else the file's name."""
    dcm = [i for i, (path, given, _, _) in enumerate(raw)
           if path.suffix.lower() == ".dcm" and given is None and path.is_file()]
    if not dcm:
        return raw
    series: dict[int, tuple[Path, str]] = {}  # index in raw -> (folder, series uid)
    for i in dcm:
        uid = dicom_series_uid(raw[i][0])
        if uid is not None:
            series[i] = (Path(os.path.abspath(raw[i][0])).parent, uid)
    per_folder: dict[Path, set[str]] = {}
    for folder, uid in series.values():
        per_folder.setdefault(folder, set()).add(uid)
    first: dict[tuple[Path, str], int] = {}
    members: dict[int, int] = {}
    for i in sorted(series, key=lambda i: str(raw[i][0])):
        key = series[i]
        first.setdefault(key, i)
        members[first[key]] = members.get(first[key], 0) + 1
    # folders that also hold a slide that is no DICOM series (its name then stays the file's)
    other_folders = {Path(os.path.abspath(raw[j][0])).parent
                     for j in range(len(raw)) if j not in series}
    out = []
    for i, row in enumerate(raw):
        if i not in series:
            out.append(row)
            continue
        folder, uid = series[i]
        if first[(folder, uid)] != i:
            continue
        path, _, mpp, label = row
        alone = per_folder[folder] == {uid} and folder not in other_folders
        if members[i] > 1:
            _logger.info("%s: %d DICOM files of series %s read as one slide", folder,
                         members[i], uid)
        out.append((path, _FolderName(folder.name) if alone and folder.name else None, mpp,
                    label))
    return out


#: index files of multi-file Hamamatsu slides, whose pieces are not slides
_VMS_INDEX = (".vms", ".vmu")


def _without_vms_parts(
    raw: list[tuple[Path, str | None, float | None, int | None]],
) -> list[tuple[Path, str | None, float | None, int | None]]:
    """Drop the inputs without an id of their own that a VMS/VMU index among the inputs names
    (``ImageFile``, ``MapFile``, ``OptimisationFile``, ...: any ``key=value`` whose value is a
    file beside the index)."""
    parts: set[str] = set()
    for path, _, _, _ in raw:
        if path.suffix.lower() not in _VMS_INDEX or not path.is_file():
            continue  # (a FIFO named .vms would block the read; it fails as a slide)
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                text = fh.read(1 << 20)  # an index is a few KB; never read a huge file whole
        except OSError:
            continue  # unreadable: the slide fails with its own reason
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep and value.strip() and not key.lstrip().startswith(("[", ";", "#")):
                parts.add(os.path.abspath(path.parent / value.strip()))
    if not parts:
        return raw
    # a row of a slide list that gives its own id is the user's choice and stays
    kept = [r for r in raw if r[1] is not None or r[0].suffix.lower() in _VMS_INDEX
            or os.path.abspath(r[0]) not in parts]
    if len(kept) < len(raw):
        _logger.info("%d file(s) named by a VMS/VMU index read as parts of that slide",
                     len(raw) - len(kept))
    return kept


#: the pictures a run writes per slide (OUT/<id>/, beside its tiles.geojson), which are no
#: slides (the PNGs would be taken for plain images with --mpp)
_OUTPUT_PICTURES = (*PICTURES, RAW_HEAT_PICTURE)


def _is_run_output(dirpath: str, filenames: list[str]) -> bool:
    """Whether a folder is a wsi-prune run's OUT: it holds the run lock or a manifest that
    names a run hash."""
    if any(n.startswith(".run") and n.endswith(".lock") for n in filenames):
        return True
    for n in filenames:
        if n.startswith("manifest") and n.endswith(".json"):
            try:
                with open(os.path.join(dirpath, n), encoding="utf-8") as fh:
                    if '"run_hash"' in fh.read(1 << 20):
                        return True
            except OSError:
                continue
    return False


def _walk(root: Path, exts: tuple[str, ...], skip: Path | None = None,
          passed: list[Path] | None = None) -> list[Path]:
    """Slide files under ``root`` (sorted; hidden files and folders skipped), following
    symlinked folders but entering each real folder once. ``passed``, when given, receives
    the plain images (:data:`~wsi_prune.io.slide.IMAGE_EXTENSIONS`) that ``exts`` leaves out.

    A run's own outputs are never slides: below ``root``, the folder ``skip`` (this run's
    OUT), any other run's OUT (:func:`_is_run_output`) and Zarr stores are not entered, and a
    slide output folder's pictures (beside its ``tiles.geojson``: heat maps, token QC, its
    ``top_tiles/``) are left out, so that an OUT inside the slide folder does not feed the
    next run its own pictures.
    """
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    skip_id = None
    if skip is not None:
        try:
            st = os.stat(skip)
            skip_id = (st.st_dev, st.st_ino)
        except OSError:
            pass
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True,
                                                onerror=lambda e: _logger.warning(
                                                    "cannot list %s: %s", e.filename, e.strerror)):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            _logger.warning("%s: already searched through another path (a symlinked folder or a "
                            "symlink loop); not entered again", dirpath)
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        if os.path.abspath(dirpath) != os.path.abspath(root) and (
                (st.st_dev, st.st_ino) == skip_id or _is_run_output(dirpath, filenames)):
            _logger.info("%s: a wsi-prune output folder, not searched for slides", dirpath)
            dirnames[:] = []
            continue
        outputs = "tiles.geojson" in filenames  # a slide's output folder: OUT/<id>/
        dirnames[:] = sorted(d for d in dirnames
                             if not d.startswith(".") and not d.lower().endswith(".zarr")
                             and not (outputs and d == "top_tiles"))
        for name in filenames:
            f = Path(dirpath) / name
            if name.startswith(".") or (outputs and name in _OUTPUT_PICTURES):
                continue
            if f.suffix.lower() not in exts:
                if passed is not None and f.suffix.lower() in IMAGE_EXTENSIONS:
                    passed.append(f)
                continue
            # a file; a symlink that leads nowhere, a FIFO, socket or device named like a
            # slide: these fail with their own reason rather than vanish from the results
            found.append(f)
    return sorted(found)


def _read_slide_list(path: Path) -> list[tuple[Path, str | None, float | None, int | None]]:
    """Rows ``(path, id, mpp, label)`` of a slide list: a CSV with a header naming the columns
    ``path`` (required), ``id``, ``mpp`` and ``label``, in any order and case. Spreadsheets'
    variants are read too: a UTF-8 byte-order mark (Excel's "CSV UTF-8"), and ``;`` or tab
    between columns (``;``: Excel where the decimal mark is a comma, so ``0,25`` is read as
    0.25 in an ``mpp`` cell of such a list)."""
    rows = []
    with open(path, newline="", encoding="utf-8-sig") as fh:
        sep = csv_delimiter(fh.readline())
        fh.seek(0)
        reader = csv.DictReader(fh, delimiter=sep)
        names = [(n or "").strip().lower() for n in reader.fieldnames or ()]
        if "path" not in names:
            raise ConfigError(f"slide list needs a 'path' column; its first line has "
                              f"{names or 'nothing'} (columns separated by ',', ';' or tab)",
                              path)
        reader.fieldnames = names
        for i, row in enumerate(reader, start=2):
            p = Path(row["path"])
            if not p.is_absolute():
                p = path.parent / p
            try:
                mpp_text = (row.get("mpp") or "").strip()
                if sep == ";":  # a ';' list comes from a locale whose decimal mark is ','
                    mpp_text = mpp_text.replace(",", ".")
                row_mpp = float(mpp_text) if mpp_text else None
                label = parse_label(row["label"]) if row.get("label") else None
            except ValueError as exc:
                raise ConfigError(f"line {i}: {exc}", path) from exc
            given = row.get("id") or None
            if p.is_dir():
                # a folder holding one slide (a DICOM series) is that slide; any other folder
                # stays as listed and fails as "a directory, not a slide file"
                found = _one_per_dicom_series([(f, None, None, None) for f in
                                               _walk(p, tuple(SLIDE_EXTENSIONS))])
                if len(found) == 1:
                    p, given = found[0][0], given or _FolderName(p.name)
            rows.append((p, given, row_mpp, label))
    return rows
