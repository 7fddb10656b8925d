"""Evaluation of a run folder the way CAMELYON16 measured it: ``predictions.csv`` against
slide labels (:mod:`wsi_prune.evaluation.slide_metrics`, with calibration from
:mod:`wsi_prune.evaluation.calibration`, and a worst case in which every labelled slide without
a result is scored wrong, :func:`worst_case`) and each slide's ``candidates.csv`` against ASAP
lesion annotations (:mod:`wsi_prune.evaluation.froc`); :func:`evaluate_run` writes
``report.md``, ``metrics.json`` and the plots.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_prune._ids import lookup_slide
from wsi_prune.errors import EvaluationError
from wsi_prune.evaluation.calibration import calibration
from wsi_prune.evaluation.froc import OFFICIAL_LEVEL0_MPP, FrocResult, froc
from wsi_prune.evaluation.plots import froc_png, roc_png
from wsi_prune.evaluation.report import _jsonable, _run_report, _write
from wsi_prune.evaluation.slide_metrics import SlideMetrics, slide_metrics
from wsi_prune.io.annotations import (
    CAMELYON16_MASK_MPP,
    read_asap_xml,
)
from wsi_prune.io.labels import read_labels

_logger = logging.getLogger(__name__)


def read_predictions(run_dir: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Rows of ``run_dir/predictions.csv`` (see docs/layout: id, status, probability, ...)."""
    path = Path(run_dir) / "predictions.csv"
    if not path.is_file():
        shards = sorted(Path(run_dir).glob("predictions.shard-*-of-*.csv"))
        why = (f"missing; {len(shards)} shard files found: run `wsi-prune merge {run_dir}` first"
               if shards else "missing: not a wsi-prune run folder")  # fmt: skip
        raise EvaluationError(why, path)
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"id", "status", "probability"} - set(reader.fieldnames or ())
        if missing:
            raise EvaluationError(f"columns {sorted(missing)} missing", path)
        return list(reader)


def _float(row: Mapping[str, str], col: str) -> float | None:
    v = (row.get(col) or "").strip()
    try:
        x = float(v)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


#: statuses whose row carries a result: ``skipped`` is a slide a re-run found complete for the
#: same config, so its row holds the stored result, as good as ``ok``
DONE = ("ok", "skipped")


def _ok_rows(run_dir: Path) -> tuple[dict[str, dict[str, str]], dict[str, Any]]:
    """Rows with a result (status ok or skipped) by id, and counts by status; ``not_ok``
    lists the slides without a result."""
    rows = read_predictions(run_dir)
    ok = {}
    for n, r in enumerate(rows, start=2):
        if r["status"] in DONE:
            if _float(r, "probability") is None:
                raise EvaluationError(f"row {n} ({r['id']}) is {r['status']} but has no "
                                      f"probability", run_dir / "predictions.csv")  # fmt: skip
            ok[r["id"]] = r
    status = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "skipped")}
    status["total"] = len(rows)
    status["not_ok"] = sorted(r["id"] for r in rows if r["status"] not in DONE)
    return ok, status


def read_candidates(path: str | os.PathLike[str]) -> np.ndarray:
    """``candidates.csv`` as (M, 3) float64 (confidence, X, Y level-0 px).

    Reads the CAMELYON16 format that
    :func:`wsi_prune.outputs.candidates.write_candidates` writes (no
    header, ``confidence,X,Y`` lines) and files of older versions that start with a header
    row naming the columns (any order).
    """
    path = Path(path)
    if not path.is_file():
        raise EvaluationError("candidates file missing", path)
    with path.open(newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    cols = [0, 1, 2]
    if rows and _float({"v": rows[0][0]}, "v") is None:
        low = [c.strip().lower() for c in rows.pop(0)]
        if {"confidence", "x", "y"} <= set(low):
            cols = [low.index("confidence"), low.index("x"), low.index("y")]
    out = np.zeros((len(rows), 3), np.float64)
    for i, r in enumerate(rows):
        try:
            out[i] = [float(r[c]) for c in cols]
        except (ValueError, IndexError):
            raise EvaluationError(f"row {i + 1} is not confidence,X,Y: {r}", path) from None
    return out


def _cost(rows: Mapping[str, Mapping[str, str]]) -> dict[str, float | None]:
    """Tokens, MACs and seconds spent on the successful slides of a run."""

    def col(name: str) -> list[float]:
        return [v for v in (_float(r, name) for r in rows.values()) if v is not None]

    def total(name: str, kind: type = float) -> float | None:
        v = col(name)
        return kind(sum(v)) if v else None

    tf = col("token_fraction")
    return {"token_fraction_mean": float(np.mean(tf)) if tf else None,
            "tissue_tiles": total("tissue_tiles", int), "kept_tiles": total("kept_tiles", int),
            "gmacs": total("gmacs"), "gmacs_dense": total("gmacs_dense"),
            "seconds": total("sec_total")}  # fmt: skip


@dataclass
class _RunEval:
    metrics: dict[str, Any]
    slide: SlideMetrics | None = None
    froc: FrocResult | None = None


def _evaluate(run_dir: Path, labels: Mapping[str, int] | None, annotations_dir: Path | None,
              only: set[str] | None, threshold: float, n_boot: int, seed: int,
              mask_mpp: float, protocol: str = "physical") -> _RunEval:
    ok_all, status = _ok_rows(run_dir)
    ok = ok_all if only is None else {k: v for k, v in ok_all.items() if k in only}
    ev = _RunEval({"run": str(run_dir), "slides": status, "cost": _cost(ok),
                   "slide_level": None, "calibration": None, "worst_case": None,
                   "froc": None})  # fmt: skip
    lab = None if labels is None else run_labels(labels, ok)
    if labels is not None:
        ids = sorted(lab)
        if not ids:
            raise EvaluationError("no successful slide of the run has a label", run_dir)
        probs, ys = [_float(ok[i], "probability") for i in ids], [lab[i] for i in ids]
        ev.slide = slide_metrics(probs, ys, threshold, n_boot, seed)
        in_run = {i.casefold() for i in (*ok_all, *status["not_ok"])}
        failed = run_labels(labels, status["not_ok"])
        ev.metrics["slide_level"] = ev.slide.summary() | {
            "unlabelled": sorted(set(ok) - set(lab)),
            "labelled_failed": sorted(failed),
            "labelled_not_in_run": sorted(k for k in labels if k.casefold() not in in_run)}
        ev.metrics["calibration"] = calibration(probs, ys).summary()
        ev.metrics["worst_case"] = worst_case(ok_all, labels, threshold, n_boot, seed)
    if annotations_dir is not None:
        ev.froc, skipped = _run_froc(run_dir, ok, lab, annotations_dir, mask_mpp, protocol)
        mpps = [m for m in (_float(ok[i], "mpp") for i in ok) if m is not None]
        off = [m for m in mpps if abs(m / OFFICIAL_LEVEL0_MPP - 1) > 0.05]
        ev.metrics["froc"] = ev.froc.summary() | {
            "tumour_slides_without_xml": skipped, "protocol": protocol,
            "mask_mpp": mask_mpp,
            # official: slides whose real level 0 is more than 5 % off the assumed 0.243 µm/px
            "slides_off_official_mpp": len(off) if protocol == "official" else None}
    return ev


def worst_case(ok: Mapping[str, Mapping[str, str]], labels: Mapping[str, int], threshold: float,
               n_boot: int, seed: int) -> dict[str, Any]:
    """Slide-level metrics over every labelled slide, a labelled slide without a result (failed,
    or absent from the run, e.g. after ``merge --partial``) scored as the worst case: a
    tumour slide probability 0, a normal slide 1. A run that drops its hard slides then
    scores no better than one that gets them wrong.

    Args:
        ok: rows with a result by slide id (:func:`_ok_rows`).
        labels: the label file: every slide in it is part of the evaluated set.
    """
    probs, ys, imputed = [], [], []
    for key, y in sorted(labels.items()):
        row = lookup_slide(ok, key)
        ys.append(y)
        if row is None:
            imputed.append(key)
            probs.append(float(1 - y))
        else:
            probs.append(_float(row, "probability"))
    m = slide_metrics(probs, ys, threshold, n_boot, seed)
    return {"n_imputed": len(imputed), "imputed": imputed,
            "slide_level": m.summary(), "calibration": calibration(probs, ys).summary()}


def _run_froc(run_dir: Path, ok: Mapping[str, Mapping[str, str]],
              labels: Mapping[str, int] | None, annotations_dir: Path, mask_mpp: float,
              protocol: str = "physical") -> tuple[FrocResult, list[str]]:
    cands, anns, mpps, skipped = {}, {}, {}, []
    xmls = {p.stem: p for p in sorted(annotations_dir.glob("*.xml")) if p.is_file()}
    for sid, row in ok.items():
        xml = lookup_slide(xmls, sid)
        if xml is not None:
            anns[sid] = read_asap_xml(xml)
        elif labels is not None and labels.get(sid) == 1:
            # A tumour slide without its lesions would turn every hit into a false positive.
            skipped.append(sid)
            continue
        mpp = _float(row, "mpp")
        if anns.get(sid) and mpp is None and protocol == "physical":
            raise EvaluationError(f"slide {sid} has no mpp in predictions.csv",
                                  run_dir / "predictions.csv")  # fmt: skip
        mpps[sid] = mpp
        cands[sid] = read_candidates(run_dir / sid / "candidates.csv")
    if skipped:
        _logger.warning("%s: %d tumour slides have no annotation XML in %s and are left out of "
                        "the FROC", run_dir, len(skipped), annotations_dir)  # fmt: skip
    if not cands:
        raise EvaluationError("no slide to compute a FROC on", run_dir)
    mpps = {k: v for k, v in mpps.items() if v is not None}
    return froc(cands, anns, mpps, mask_mpp=mask_mpp, protocol=protocol), sorted(skipped)


def run_labels(labels: Mapping[str, int], ids: Iterable[str]) -> dict[str, int]:
    """Labels of a run's slide ids, matched as :func:`~wsi_prune._ids.lookup_slide`
    matches them (case-insensitively: CAMELYON16's reference.csv says Test_001 for
    test_001.tif); ids without a label are left out."""
    found = {i: lookup_slide(labels, i) for i in ids}
    return {i: v for i, v in found.items() if v is not None}


def _load_labels(labels_csv: str | os.PathLike[str] | None) -> dict[str, int] | None:
    return None if labels_csv is None else read_labels(labels_csv)


def evaluate_run(run_dir: str | os.PathLike[str], labels_csv: str | os.PathLike[str] | None = None,
                 annotations_dir: str | os.PathLike[str] | None = None,
                 out: str | os.PathLike[str] | None = None, *, threshold: float = 0.5,
                 n_boot: int = 1000, seed: int = 0, mask_mpp: float = CAMELYON16_MASK_MPP,
                 protocol: str = "physical") -> dict[str, Any]:
    """Evaluate a run folder; write ``report.md``, ``metrics.json`` and plots to ``out``.

    Args:
        run_dir: folder holding ``predictions.csv`` and ``<id>/candidates.csv``.
        labels_csv: slide labels (see :func:`wsi_prune.io.labels.read_labels`): slide-level
            metrics and calibration on the slides with a result, and the same metrics with
            every labelled slide that failed or is absent from the run scored as the worst
            case (:func:`worst_case`).
        annotations_dir: ``<id>.xml`` ASAP annotations: lesion-level FROC. Slides without an
            XML are normal, unless the labels call them tumour (then they are left out).
        out: output folder (default ``run_dir/evaluation``).
        threshold, n_boot, seed: see :func:`slide_metrics`.
        mask_mpp: FROC evaluation-mask resolution, µm/px (physical protocol only).
        protocol: FROC protocol, ``physical`` or ``official``
            (:mod:`wsi_prune.evaluation.froc`).

    Returns:
        The metrics written to ``metrics.json``.
    """
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "evaluation"
    ann = None if annotations_dir is None else Path(annotations_dir)
    ev = _evaluate(run_dir, _load_labels(labels_csv), ann, None, threshold, n_boot, seed,
                   mask_mpp, protocol)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    if ev.slide is not None:
        roc_png(out / "roc.png", ev.slide)
    if ev.froc is not None:
        froc_png(out / "froc.png", ev.froc)
    _write(out / "metrics.json", json.dumps(_jsonable(ev.metrics), indent=2))
    _write(out / "report.md", _run_report(ev))
    return ev.metrics
