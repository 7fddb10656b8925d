"""Fidelity audit of a production run, without labels (``wsi-prune run --audit-fraction F``).

After a pruned run, the dense path (:meth:`wsi_prune.config.RunConfig.dense`: the same models
and weights, every tissue tile and token to the ViT) runs on a seeded random fraction of the
slides that have a result, into ``OUT/.audit/dense/`` (a hidden folder: slide ids are never
hidden, :func:`wsi_prune._ids.safe_id`, so it cannot collide with ``OUT/<id>``). The two are
compared as ``evaluate --compare`` compares them without labels
(:mod:`wsi_prune.evaluation.agreement`), into ``OUT/audit.md`` and ``OUT/audit.json``. The run's
own ``predictions.csv``, ``manifest.json`` and run hash are not touched: the audit is not part
of the config.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsi_prune.errors import ConfigError
from wsi_prune.evaluation.agreement import (
    HOT_FRACTION,
    heatmap_agreement,
    probability_agreement,
)
from wsi_prune.evaluation.report import _jsonable, _write, agreement_table
from wsi_prune.evaluation.runs import _float, _ok_rows

_logger = logging.getLogger(__name__)

#: where the audit's dense run goes, relative to OUT
AUDIT_DIR = Path(".audit") / "dense"


def choose_audit_slides(ids: Sequence[str], fraction: float, seed: int) -> list[str]:
    """``ceil(fraction * len(ids))`` slides (at least one) drawn without replacement by a
    generator seeded with ``seed``, sorted; the same ids, fraction and seed give the same
    slides whatever their order."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"the audit fraction must be in (0, 1], got {fraction}")
    pool = sorted(ids)
    if not pool:
        return []
    n = max(1, math.ceil(fraction * len(pool) - 1e-9))
    rng = np.random.default_rng(seed)
    return sorted(pool[i] for i in rng.choice(len(pool), n, replace=False))


def write_audit(out: str | Path, chosen: Sequence[str], fraction: float, seed: int,
                eligible: int, threshold: float, hot_fraction: float = HOT_FRACTION
                ) -> dict[str, Any]:
    """Compare ``OUT``'s results with the dense run in ``OUT/.audit/dense`` on ``chosen``;
    write ``OUT/audit.json`` and ``OUT/audit.md``.

    Args:
        out: the run folder (its ``predictions.csv`` is read, never written).
        chosen: the audited slide ids (:func:`choose_audit_slides`).
        fraction, seed: how they were chosen (recorded).
        eligible: slides of the run with a result, drawn from.
        threshold: slide probability at or above which a slide is called tumour.

    Returns:
        What ``audit.json`` holds: ``fraction``, ``seed``, ``slides_eligible``,
        ``slides_chosen``, ``dense_run``, ``dense_failed`` (chosen slides the dense path could
        not run), ``n_slides`` (compared), and the agreement: ``probability``, ``heatmap``,
        ``hot_spots`` (see :mod:`wsi_prune.evaluation.agreement`).
    """
    out = Path(out)
    dense = out / AUDIT_DIR
    ok_p, _ = _ok_rows(out)
    ok_d = _ok_rows(dense)[0] if chosen else {}
    ids = [i for i in chosen if i in ok_d and i in ok_p]
    res: dict[str, Any] = {
        "fraction": fraction, "seed": seed, "slides_eligible": eligible,
        "slides_chosen": list(chosen), "dense_run": str(AUDIT_DIR),
        "dense_failed": [i for i in chosen if i not in ok_d], "n_slides": len(ids),
        "probability": None, "heatmap": None, "hot_spots": None}  # fmt: skip
    if ids:
        res["probability"] = probability_agreement(
            {i: _float(ok_d[i], "probability") for i in ids},
            {i: _float(ok_p[i], "probability") for i in ids}, ids, threshold)
        res["heatmap"], res["hot_spots"] = heatmap_agreement(dense, out, ids, hot_fraction)
    _write(out / "audit.json", json.dumps(_jsonable(res), indent=2))
    _write(out / "audit.md", _audit_report(res))
    return res


def _audit_report(r: dict[str, Any]) -> str:
    text = (f"# Fidelity audit\n\nThe dense path (same models and weights, every tissue tile "
            f"and token to the ViT) ran on {len(r['slides_chosen'])} of the "
            f"{r['slides_eligible']} slides with a result, drawn at random (fraction "
            f"{r['fraction']:g}, seed {r['seed']}): {', '.join(r['slides_chosen']) or 'none'}. "
            f"Its outputs are in `{r['dense_run']}/`. No labels are used: the table says how far "
            "pruning moved this run's answers from the dense model's on these slides, not "
            "whether either is right.\n")  # fmt: skip
    if r["dense_failed"]:
        text += f"\nThe dense path failed on: {', '.join(r['dense_failed'])}\n"
    if not r["n_slides"]:
        return text + "\nNo slide to compare.\n"
    return text + "\n" + agreement_table(r["probability"], r["heatmap"], r["hot_spots"])
