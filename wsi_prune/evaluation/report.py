"""``report.md`` and ``metrics.json`` of an evaluation: Markdown tables of slide-level
metrics, FROC operating points and cost, for one run or a dense-versus-pruned comparison.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_prune._files import write_text_atomic

if TYPE_CHECKING:
    from wsi_prune.evaluation.runs import _RunEval


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _write(path: Path, text: str) -> None:
    write_text_atomic(path, text if text.endswith("\n") else text + "\n")


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _ci(ci: Sequence[float] | None) -> str:
    return "n/a" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _slide_section(s: Mapping[str, Any]) -> str:
    rows = [("AUC", s["auc"]), ("AUC 95 % CI (bootstrap)", _ci(s["auc_ci"])),
            ("bootstrap resamples", s["n_boot"]), (f"accuracy @ {s['threshold']}", s["accuracy"]),
            ("sensitivity", s["sensitivity"]), ("specificity", s["specificity"]),
            ("TP / FP / TN / FN", f"{s['tp']} / {s['fp']} / {s['tn']} / {s['fn']}")]
    text = (f"## Slide level ({s['n']} slides: {s['n_pos']} tumour, {s['n_neg']} normal)\n\n"
            + _table(("metric", "value"), rows) + "\n\n![ROC](roc.png)\n")
    if s["unlabelled"]:
        text += f"\nSlides without a label (left out): {', '.join(s['unlabelled'])}\n"
    return text


def _froc_rows(f: Mapping[str, Any]) -> list[Any]:
    sens = f["sensitivities"] or [None] * len(f["fp_rates"])
    return [*sens, f["average"]]


def _froc_header(f: Mapping[str, Any]) -> list[str]:
    return ["", *(f"{r:g} FP" for r in f["fp_rates"]), "average (FROC score)"]


def _froc_section(f: Mapping[str, Any]) -> str:
    text = (f"## Lesion level: FROC ({f['n_slides']} slides, {f['n_lesions']} lesions to find, "
            f"{f['n_itc']} ITC ignored)\n\n" + _table(_froc_header(f), [["sensitivity",
                                                                          *_froc_rows(f)]])
            + f"\n\n{f['n_candidates']} candidates: {f['n_fp']} false positives, "
            f"{f['n_ignored']} on ITCs or exclusion regions. Protocol: CAMELYON16 (lesions grown "
            f"by 37.5 µm, the challenge's 75 µm rule, at {f['mask_mpp']:.3f} µm/px; ITCs "
            f"ignored; see wsi_prune/evaluate.py for the deviations from the challenge "
            f"script).\n\n![FROC](froc.png)\n")  # fmt: skip
    if f["tumour_slides_without_xml"]:
        text += ("\nTumour slides without annotations (left out): "
                 + ", ".join(f["tumour_slides_without_xml"]) + "\n")
    return text


def _cost_rows(c: Mapping[str, Any]) -> list[tuple[str, Any]]:
    return [("mean token fraction", c["token_fraction_mean"]), ("tissue tiles", c["tissue_tiles"]),
            ("kept tiles", c["kept_tiles"]), ("GMACs", c["gmacs"]),
            ("GMACs of a dense run", c["gmacs_dense"]), ("seconds", c["seconds"])]


def _run_report(ev: _RunEval) -> str:
    m = ev.metrics
    s = m["slides"]
    parts = [f"# Evaluation of {m['run']}\n",
             f"{s['total']} slides: {s['ok']} ok, {s['failed']} failed, {s['skipped']} skipped "
             "(ok and skipped slides, whose results a re-run found complete, are "
             "evaluated).\n"]  # fmt: skip
    if s["not_ok"]:
        parts.append(f"Not ok: {', '.join(s['not_ok'])}\n")
    if m["slide_level"]:
        parts.append(_slide_section(m["slide_level"]))
    if m["froc"]:
        parts.append(_froc_section(m["froc"]))
    parts.append("## Cost\n\n" + _table(("", "value"), _cost_rows(m["cost"])) + "\n")
    return "\n".join(parts)


def _compare_report(m: Mapping[str, Any], with_auc: bool, with_froc: bool) -> str:
    p, h, c = m["probability"], m["heatmap"], m["cost"]
    parts = [f"# Pruned versus dense\n\ndense: `{m['dense']}`  \npruned: `{m['pruned']}`  \n"
             f"{m['n_slides']} slides ok in both.\n",
             "## Slide probabilities\n\n" + _table(("", "value"), [
                 ("max abs difference", p["max_abs_diff"]),
                 ("mean abs difference", p["mean_abs_diff"]),
                 (f"label agreement @ {p['threshold']}", p["label_agreement"]),
                 ("disagreeing slides", ", ".join(p["disagreeing"]) or "none")]) + "\n",
             "## Tile heatmap Spearman\n\n" + _table(
                 ("tiles", "mean over slides", "min", "pooled", "slides"),
                 [(name, h[k]["mean"], h[k]["min"], h[k]["pooled"], h[k]["slides"])
                  for name, k in (("ViT-scored in both", "vit"), ("all", "all"))]) + "\n"
             + "".join(f"\n- not compared: {v['error']}\n" for v in h["per_slide"].values()
                       if "error" in v),
             "## Cost\n\n" + _table(("", "dense", "pruned"), [
                 (n, a, b) for (n, a), (_, b) in zip(_cost_rows(c["dense"]),
                                                     _cost_rows(c["pruned"]), strict=True)])
             + f"\n\nGMACs dense/pruned: {_fmt(c['gmacs_ratio'], 2)}; "
             f"speed-up (seconds dense/pruned): {_fmt(c['speedup'], 2)}\n"]  # fmt: skip
    ev, diff = m.get("evaluation"), m.get("difference")
    if with_auc:
        sl = {k: v["slide_level"] for k, v in ev.items()}
        parts.append("## AUC\n\n" + _table(("run", "AUC", "95 % CI", "accuracy"), [
            (k, v["auc"], _ci(v["auc_ci"]), v["accuracy"]) for k, v in sl.items()])
            + f"\n\npruned - dense: {_fmt(diff['auc'])} (paired bootstrap 95 % CI "
            f"{_ci(diff['auc_ci'])})\n\n![ROC](roc.png)\n")  # fmt: skip
    if with_froc:
        fr = {k: v["froc"] for k, v in ev.items()}
        header = _froc_header(fr["dense"])
        rows = [[k, *_froc_rows(v)] for k, v in fr.items()]
        if diff["sensitivities"] is not None:
            rows.append(["pruned - dense", *diff["sensitivities"], diff["froc"]])
        parts.append("## FROC\n\n" + _table(header, rows) + "\n\n![FROC](froc.png)\n")
    return "\n".join(parts)
