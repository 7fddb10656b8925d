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


def _slide_section(s: Mapping[str, Any], cal: Mapping[str, Any] | None = None,
                   worst: Mapping[str, Any] | None = None) -> str:
    rows = [("AUC", s["auc"]), ("AUC 95 % CI (bootstrap)", _ci(s["auc_ci"])),
            ("bootstrap resamples", s["n_boot"]), (f"accuracy @ {s['threshold']}", s["accuracy"]),
            ("sensitivity", s["sensitivity"]), ("specificity", s["specificity"]),
            ("TP / FP / TN / FN", f"{s['tp']} / {s['fp']} / {s['tn']} / {s['fn']}")]
    if cal is not None:
        rows += [("Brier score", cal["brier"]), (f"ECE ({cal['binning']})", cal["ece"])]
    text = (f"## Slide level ({s['n']} slides: {s['n_pos']} tumour, {s['n_neg']} normal)\n\n"
            + _table(("metric", "value"), rows) + "\n\n![ROC](roc.png)\n")
    if s["unlabelled"]:
        text += f"\nSlides without a label (left out): {', '.join(s['unlabelled'])}\n"
    if worst is not None:
        text += _worst_line(s, worst)
    return text


def _worst_line(s: Mapping[str, Any], worst: Mapping[str, Any]) -> str:
    failed, missing = s.get("labelled_failed", []), s.get("labelled_not_in_run", [])
    if not worst["n_imputed"]:
        return "\nEvery labelled slide has a result: the worst case is the table above.\n"
    w, wc = worst["slide_level"], worst["calibration"]
    return (f"\n**Labelled slides without a result: {len(failed)} failed"
            f"{' (' + ', '.join(failed) + ')' if failed else ''}, {len(missing)} not in the run"
            f"{' (' + ', '.join(missing) + ')' if missing else ''}.** Worst case, those "
            f"{worst['n_imputed']} scored wrong (tumour 0, normal 1), over {w['n']} slides: "
            f"AUC {_fmt(w['auc'])} {_ci(w['auc_ci'])}, accuracy {_fmt(w['accuracy'])}, "
            f"sensitivity {_fmt(w['sensitivity'])}, specificity {_fmt(w['specificity'])}, "
            f"Brier {_fmt(wc['brier'])}, ECE {_fmt(wc['ece'])}.\n")


def _froc_rows(f: Mapping[str, Any]) -> list[Any]:
    sens = f["sensitivities"] or [None] * len(f["fp_rates"])
    return [*sens, f["average"]]


def _froc_header(f: Mapping[str, Any]) -> list[str]:
    return ["", *(f"{r:g} FP" for r in f["fp_rates"]), "average (FROC score)"]


def _excl(f: Mapping[str, Any]) -> str:
    return "" if f.get("protocol") == "official" else " or exclusion regions"


def _protocol(f: Mapping[str, Any]) -> str:
    if f.get("protocol") == "official":
        off = f.get("slides_off_official_mpp") or 0
        return ("Protocol: official, as CAMELYON16's Evaluation_FROC.py computes it (level 0 "
                "assumed 0.243 µm/px on every slide, mask at level 5 = 7.776 µm/px, lesions "
                "grown by 75 µm, ITCs < 275 µm after growth ignored, exclusion hits false "
                f"positives, lowest confidence dropped); {off} slide(s) are more than 5 % off "
                "0.243 µm/px, where the 75/275 µm rules are not physical. See "
                "wsi_prune/evaluation/froc.py.")
    return (f"Protocol: physical (CAMELYON16's rules on each slide's own µm/px: lesions grown "
            f"by 37.5 µm, the challenge's 75 µm rule, at {f['mask_mpp']:.3f} µm/px; ITCs "
            f"ignored; see wsi_prune/evaluation/froc.py for the deviations from the challenge "
            f"script, and --protocol official for leaderboard-comparable numbers).")


def _froc_section(f: Mapping[str, Any]) -> str:
    text = (f"## Lesion level: FROC ({f['n_slides']} slides, {f['n_lesions']} lesions to find, "
            f"{f['n_itc']} ITC ignored)\n\n" + _table(_froc_header(f), [["sensitivity",
                                                                          *_froc_rows(f)]])
            + f"\n\n{f['n_candidates']} candidates: {f['n_fp']} false positives, "
            f"{f['n_ignored']} ignored (on ITCs{_excl(f)}). {_protocol(f)}\n\n"
            f"![FROC](froc.png)\n")  # fmt: skip
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
        parts.append(_slide_section(m["slide_level"], m.get("calibration"),
                                    m.get("worst_case")))
    if m["froc"]:
        parts.append(_froc_section(m["froc"]))
    parts.append("## Cost\n\n" + _table(("", "value"), _cost_rows(m["cost"])) + "\n")
    return "\n".join(parts)


def agreement_table(p: Mapping[str, Any], h: Mapping[str, Any], hot: Mapping[str, Any]) -> str:
    """The label-free agreement of a pruned and a dense run (``evaluate --compare`` and
    ``audit.md``): probabilities, tile-heat Spearman, hot spots kept."""

    def spread(v: Mapping[str, Any]) -> str:
        if v["median"] is None:
            return "n/a"
        return f"median {v['median']:.3f} [{v['min']:.3f}, {v['max']:.3f}], {v['slides']} slides"

    hs = hot["per_slide_stats"]
    rows = [("slides", p["n"], ""),
            ("max abs probability difference", p["max_abs_diff"], ""),
            ("mean abs probability difference", p["mean_abs_diff"], ""),
            (f"label agreement @ {p['threshold']}", p["label_agreement"],
             "disagreeing: " + (", ".join(p["disagreeing"]) or "none")),
            ("tile-heat Spearman, all tissue tiles (pooled)", h["all"]["pooled"],
             f"{spread(h['all'])}; {h['all']['tiles']} tiles"),
            ("tile-heat Spearman, tiles the ViT scored in both (pooled)", h["vit"]["pooled"],
             f"{spread(h['vit'])}; {h['vit']['tiles']} tiles"),
            (f"dense hot spots (top {hot['hot_fraction']:.0%} tiles) kept by triage",
             hot["recall"], f"{hot['kept']} of {hot['hot']} tiles; {spread(hs)}")]
    text = _table(("", "value", "behind it"), rows) + "\n"
    errors = [f"- not compared: {v['error']}" for v in h["per_slide"].values() if "error" in v]
    return text + ("\n" + "\n".join(errors) + "\n" if errors else "")


def _lesion_section(r: Mapping[str, Any]) -> str:
    head = (f"## Lesion recall of the pruned run ({r['slides']} annotated slides, "
            f"{r['slides_with_lesions']} with lesions; masks at {r['lesion_mask_mpp']:g} µm/px; "
            "ITC < 200 µm, micro 200-2000 µm, macro > 2000 µm longest diameter)\n\n")
    if r["triage"] is None:
        return head + "No annotated slide.\n"
    ref = r.get("triage_dense_rank")
    rows = []
    for c in (*r["size_classes"], "all"):
        t, k = r["triage"][c], r["tokens"][c]
        out_um2 = t["area_um2"] - t["area_in_tissue_um2"]
        row = (c, t["lesions"], t["area_in_tissue_um2"] / 1e6, t["area_recall"])
        if ref is not None:
            row += (ref[c]["area_recall"],)
        rows.append(row + (out_um2 / 1e6, f"{t['tiles_kept']} / {t['tiles']}", t["tile_recall"],
                           f"{t['lesions_with_kept_tile']} / {t['lesions']}",
                           f"{k['reached']} / {k['patches']}", k["recall"]))
    cols = ("class", "lesions", "area in tissue tiles (mm²)", "area recall")
    if ref is not None:
        cols += ("area recall, dense ranking",)
    text = head + _table(cols + ("area outside tissue tiles (mm²)", "tiles kept", "tile recall",
                                 "lesions with a kept tile",
                                 "lesion patches reaching the last block", "token recall"),
                         rows)  # fmt: skip
    text += ("\n\nArea and tile recall: what the CNN triage sent to the ViT; token recall: "
             "patches mostly inside a lesion, over all tissue tiles, whose token reached the "
             "last ViT block (a patch of a dropped tile did not).\n")
    if ref is not None:
        text += ("Dense ranking: on each slide, as many tiles as the triage kept, the highest "
                 "of the dense run's tile heat "
                 f"({r['dense_rank_slides']} of {r['slides']} slides): what the dense model's "
                 "own ranking keeps at the same budget.\n")
    if r["tumour_slides_without_xml"]:
        text += ("\nTumour slides without annotations (left out): "
                 + ", ".join(r["tumour_slides_without_xml"]) + "\n")
    return text


def _compare_report(m: Mapping[str, Any], with_auc: bool, with_froc: bool) -> str:
    c = m["cost"]
    only = "".join(f"\nOnly {k.split('_')[1]} has a result for: {', '.join(m[k])}  "
                   for k in ("only_dense", "only_pruned") if m[k])
    parts = [f"# Pruned versus dense\n\ndense: `{m['dense']}`  \npruned: `{m['pruned']}`  \n"
             f"{m['n_slides']} slides ok in both.{only}\n",
             "## Agreement (no labels needed)\n\n"
             + agreement_table(m["probability"], m["heatmap"], m["hot_spots"]),
             "## Cost\n\n" + _table(("", "dense", "pruned"), [
                 (n, a, b) for (n, a), (_, b) in zip(_cost_rows(c["dense"]),
                                                     _cost_rows(c["pruned"]), strict=True)])
             + f"\n\nGMACs dense/pruned: {_fmt(c['gmacs_ratio'], 2)}; "
             f"speed-up (seconds dense/pruned): {_fmt(c['speedup'], 2)}\n"]  # fmt: skip
    ev, diff = m.get("evaluation"), m.get("difference")
    if with_auc:
        sl = {k: v["slide_level"] for k, v in ev.items()}
        cal = {k: v["calibration"] for k, v in ev.items()}
        wc = {k: v["worst_case"] for k, v in ev.items()}
        rows = [(k, v["auc"], _ci(v["auc_ci"]), v["accuracy"], cal[k]["brier"], cal[k]["ece"],
                 wc[k]["slide_level"]["auc"], wc[k]["n_imputed"]) for k, v in sl.items()]
        rows.append(("pruned - dense", diff["auc"], f"paired {_ci(diff['auc_ci'])}", "",
                     diff["brier"], diff["ece"], diff["auc_worst_case"], ""))
        a = diff["at_95_specificity"]
        text = ("## Slide level\n\n" + _table(
            ("run", "AUC", "95 % CI", "accuracy", "Brier", "ECE (10 bins)", "AUC worst case",
             "slides scored worst"), rows)
            + f"\n\n{diff['n_slides']} slides with a label, ok in both; {diff['n_boot']} "
            f"bootstrap resamples of the slides, each scoring both runs (paired); resampling "
            f"each run on its own would give {_ci(diff['auc_ci_unpaired'])}. Paired 95 % CIs "
            f"of Δ Brier {_ci(diff.get('brier_ci'))} and Δ ECE {_ci(diff.get('ece_ci'))} (the "
            "ECE of a few dozen slides moves when one crosses a bin edge).\n")  # fmt: skip
        if a is not None:
            text += (f"\nAt the dense run's {a['specificity_target']:.0%}-specificity threshold "
                     f"({a['threshold']:.4f}; {a['n_pos']} tumour, {a['n_neg']} normal slides): "
                     f"sensitivity dense {_fmt(a['sensitivity_dense'])}, pruned "
                     f"{_fmt(a['sensitivity_pruned'])} (Δ {_fmt(a['delta_sensitivity'])}); "
                     f"specificity dense {_fmt(a['specificity_dense'])}, pruned "
                     f"{_fmt(a['specificity_pruned'])}.\n")
        parts.append(text + "\n![ROC](roc.png)\n")
    if with_froc:
        fr = {k: v["froc"] for k, v in ev.items()}
        header = _froc_header(fr["dense"])
        rows = [[k, *_froc_rows(v)] for k, v in fr.items()]
        if diff["sensitivities"] is not None:
            rows.append(["pruned - dense", *diff["sensitivities"], diff["froc"]])
        f = fr["dense"]
        parts.append(f"## FROC ({f['n_slides']} slides, {f['n_lesions']} lesions to find, "
                     f"{f['n_itc']} ITC ignored)\n\n" + _table(header, rows)
                     + f"\n\n{_protocol(f)}\n\n![FROC](froc.png)\n")  # fmt: skip
    if m.get("lesion_recall") is not None:
        parts.append(_lesion_section(m["lesion_recall"]))
    return "\n".join(parts)
