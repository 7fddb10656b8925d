"""Slide labels: a CSV of ``slide, label`` rows (CAMELYON16 ``reference.csv``, with or without
a header; CAMELYON17 ``stage_labels.csv``). :func:`parse_label` maps every label spelling used
by the two challenges to 0/1; slide ids are matched as :mod:`wsi_prune._ids` says.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from wsi_prune._ids import slide_key
from wsi_prune.errors import AnnotationError

# Every label spelling of CAMELYON16 (reference.csv) and CAMELYON17 (stage_labels.csv). pN0(i+)
# and 'itc' are isolated tumour cells, which both challenges count as negative.
_LABELS = {
    "tumor": 1, "tumour": 1, "positive": 1, "pos": 1, "1": 1, "true": 1,
    "normal": 0, "negative": 0, "neg": 0, "0": 0, "false": 0,
    "pn0": 0, "pn0(i+)": 0, "itc": 0,
    "pn1mi": 1, "pn1": 1, "pn2": 1, "pn3": 1, "micro": 1, "macro": 1,
}  # fmt: skip
_KEY_COLUMNS = ("slide", "image", "id", "patient", "name", "case", "filename", "file")
_LABEL_COLUMNS = ("label", "stage", "class", "diagnosis", "reference", "target")


def parse_label(value: str) -> int:
    """Slide label as 0/1.

    Accepts ``Tumor``/``Normal`` (any case), ``1``/``0``, ``positive``/``negative``, CAMELYON17
    pN stages (``pN0``, ``pN0(i+)`` -> 0; ``pN1mi``, ``pN1``, ``pN2``, ``pN3`` -> 1) and
    CAMELYON17 slide labels (``negative``, ``itc`` -> 0; ``micro``, ``macro`` -> 1). Isolated
    tumour cells count as negative, as in the CAMELYON17 challenge.

    Raises:
        ValueError: any other value.
    """
    key = "".join(str(value).split()).lower()
    if key in _LABELS:
        return _LABELS[key]
    raise ValueError(f"unknown label {value!r} (expected Tumor/Normal, 1/0, positive/negative, "
                     f"a pN stage or negative/itc/micro/macro)")  # fmt: skip


def _header_columns(row: list[str], path: Path, why: str) -> tuple[int, int]:
    """Slide and label columns named by a header row; ``why`` explains a row that is neither."""
    low = [c.strip().lower() for c in row]
    key = next((low.index(k) for k in _KEY_COLUMNS if k in low), None)
    lab = next((low.index(k) for k in _LABEL_COLUMNS if k in low), None)
    if key is None and lab is None:
        # Not a header we know: most likely a data row with a bad label, so say that.
        raise AnnotationError(f"row 1: {why}", path)
    if lab is None:
        lab = 1 if key == 0 else 0
    key = (1 if lab == 0 else 0) if key is None else key
    if key == lab:
        raise AnnotationError(f"cannot tell slide and label columns in header {row}", path)
    return key, lab


def csv_delimiter(first_line: str) -> str:
    """The column separator of a CSV whose first line is ``first_line``: ``,`` (CAMELYON's
    files, most CSVs), or ``;`` or a tab when that line has one and no ``,``, as a spreadsheet
    may save a list (``;`` where the decimal mark is a comma). Label files and slide lists
    (:mod:`wsi_prune.pipeline.inputs`) both read this way."""
    return next((d for d in (";", "\t") if d in first_line and "," not in first_line), ",")


def read_labels(path: str | os.PathLike[str]) -> dict[str, int]:
    """Read a slide-label CSV into ``{slide id: 0/1}``.

    The first row is a header when its label cell is not a label; header names pick the
    columns (``slide``/``image``/``patient``... and ``label``/``stage``...), otherwise the
    first two columns are used and any further ones (CAMELYON16's lesion type) are ignored.
    Slide ids lose their folder and slide-file suffix (``patient_004_node_4.tif`` ->
    ``patient_004_node_4``). Columns are separated by ``,``, or by ``;`` or a tab when the
    first line has no ``,`` (as spreadsheets may save them); a UTF-8 byte-order mark is
    skipped.

    Raises:
        AnnotationError: missing file, empty file, an unknown label or a slide listed twice with
            different labels; the message names the row.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError("no such label file", path)
    with path.open(newline="", encoding="utf-8-sig") as fh:
        text = fh.read()
    sep = csv_delimiter(next((line for line in text.splitlines() if line.strip()), ""))
    rows = [r for r in csv.reader(io.StringIO(text, newline=""), delimiter=sep)
            if r and any(c.strip() for c in r)]
    if not rows:
        raise AnnotationError("label file is empty", path)
    key_col, lab_col, start = 0, 1, 0
    first = rows[0]
    try:
        parse_label(first[1] if len(first) > 1 else "")
    except ValueError as exc:
        key_col, lab_col = _header_columns(first, path, str(exc))
        start = 1
    labels: dict[str, int] = {}
    for n, row in enumerate(rows[start:], start=start + 1):
        if len(row) <= max(key_col, lab_col):
            raise AnnotationError(f"row {n} has {len(row)} columns, expected slide and label: "
                                  f"{row}", path)  # fmt: skip
        key = slide_key(row[key_col])
        try:
            value = parse_label(row[lab_col])
        except ValueError as exc:
            raise AnnotationError(f"row {n} ({key}): {exc}", path) from None
        if labels.get(key, value) != value:
            raise AnnotationError(f"row {n}: slide {key!r} listed again with another label", path)
        labels[key] = value
    if not labels:
        raise AnnotationError("label file has a header but no rows", path)
    return labels
