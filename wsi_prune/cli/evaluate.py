"""``wsi-prune evaluate``: CAMELYON-style metrics of a run, or a pruned run against a dense one.

A standalone click command; :mod:`wsi_prune.cli` registers it with ``main.add_command``.
"""

from __future__ import annotations

from pathlib import Path

import click

from wsi_prune.cli.common import handle_errors

_RUN = click.Path(exists=True, file_okay=False, path_type=Path)


@click.command("evaluate", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", required=False, type=_RUN)
@click.option("--compare", nargs=2, type=_RUN, default=None, metavar="DENSE_RUN PRUNED_RUN",
              help="Compare a pruned run with a dense run of the same slides.")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Slide labels CSV (slide,label: Tumor/Normal, 1/0, pN stages...).")
@click.option("--annotations", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of ASAP XML lesion annotations named <slide id>.xml (FROC).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Report folder [default: RUN_DIR/evaluation, or PRUNED_RUN/comparison].")
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Slide probability at or above which a slide is called tumour.")
@click.option("--bootstrap", "n_boot", type=click.IntRange(0), default=1000, show_default=True,
              help="Bootstrap resamples for the AUC confidence interval.")
@click.option("--seed", type=int, default=0, show_default=True, help="Bootstrap seed.")
@click.option("--mask-mpp", type=click.FloatRange(min=0, min_open=True), default=None,
              help="FROC evaluation-mask µm/px [default: 7.776, CAMELYON16 level 5; physical "
                   "protocol only].")
@click.option("--protocol", type=click.Choice(["physical", "official"]), default="physical",
              show_default=True,
              help="FROC protocol: physical applies CAMELYON16's 75 µm / 275 µm rules on each "
                   "slide's own µm/px; official reproduces Evaluation_FROC.py (level 0 taken as "
                   "0.243 µm/px, mask at level 5) for leaderboard-comparable numbers.")
@handle_errors
def evaluate(run_dir: Path | None, compare: tuple[Path, Path] | None, labels: Path | None,
             annotations: Path | None, out: Path | None, threshold: float, n_boot: int,
             seed: int, mask_mpp: float | None, protocol: str) -> None:
    """Slide AUC (bootstrap 95 % CI), accuracy, sensitivity, specificity, Brier score and ECE,
    the same with every labelled slide that failed or is missing from the run scored as the
    worst case, and the CAMELYON16 lesion FROC of a run; or how a pruned run compares with a
    dense one (agreement, tile-heat Spearman, ΔAUC with a paired bootstrap CI, ΔFROC, Δ
    calibration, triage and token recall per lesion size class). Writes report.md,
    metrics.json and ROC/FROC plots.

    \b
    Examples:
      wsi-prune evaluate out/ --labels CAMELYON16/reference.csv \\
          --annotations CAMELYON16/annotations
      wsi-prune evaluate out/ --labels synth/labels.csv --out reports/run1
      wsi-prune evaluate --compare out-dense/ out-pruned/ --labels synth/labels.csv \\
          --annotations synth/
    """
    from wsi_prune.evaluation.compare import compare_runs
    from wsi_prune.evaluation.runs import evaluate_run
    from wsi_prune.io.annotations import CAMELYON16_MASK_MPP

    if (run_dir is None) == (compare is None):
        raise click.UsageError("give either RUN_DIR or --compare DENSE_RUN PRUNED_RUN")
    if protocol == "official" and mask_mpp is not None:
        raise click.UsageError("--mask-mpp: the official protocol fixes the mask at 7.776 µm/px")
    kw = {"threshold": threshold, "n_boot": n_boot, "seed": seed,
          "mask_mpp": mask_mpp or CAMELYON16_MASK_MPP, "protocol": protocol}  # fmt: skip
    if compare is None and labels is None and annotations is None:
        raise click.UsageError("give --labels and/or --annotations to evaluate a run")
    if compare is None:
        dest = out or run_dir / "evaluation"
        m = evaluate_run(run_dir, labels, annotations, dest, **kw)
        _echo_run(m)
    else:
        dest = out or compare[1] / "comparison"
        m = compare_runs(compare[0], compare[1], dest, labels, annotations, **kw)
        _echo_compare(m)
    click.echo(f"report: {dest / 'report.md'}")


def _f(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _echo_run(m: dict) -> None:
    s = m["slide_level"]
    if s:
        ci = s["auc_ci"]
        ci_text = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        c = m["calibration"]
        click.echo(f"AUC {_f(s['auc'])}{ci_text}  accuracy {_f(s['accuracy'])}  "
                   f"sensitivity {_f(s['sensitivity'])}  specificity {_f(s['specificity'])}  "
                   f"Brier {_f(c['brier'])}  ECE {_f(c['ece'])}  ({s['n']} slides)")  # fmt: skip
        w = m["worst_case"]
        if w["n_imputed"]:
            click.echo(f"{len(s['labelled_failed'])} labelled slide(s) failed, "
                       f"{len(s['labelled_not_in_run'])} missing from the run; worst case "
                       f"(scored wrong): AUC {_f(w['slide_level']['auc'])}  accuracy "
                       f"{_f(w['slide_level']['accuracy'])}  ({w['slide_level']['n']} "
                       "slides)")  # fmt: skip
    f = m["froc"]
    if f:
        click.echo(f"FROC {_f(f['average'])}  ({f['n_lesions']} lesions, {f['n_slides']} slides, "
                   f"{f['protocol']} protocol)")


def _echo_compare(m: dict) -> None:
    p, c, h = m["probability"], m["cost"], m["heatmap"]
    click.echo(f"{m['n_slides']} slides: max |dp| {_f(p['max_abs_diff'])}, mean |dp| "
               f"{_f(p['mean_abs_diff'])}, label agreement {_f(p['label_agreement'])}")
    click.echo(f"tile-heat Spearman: all tissue tiles {_f(h['all']['pooled'])} pooled, median "
               f"{_f(h['all']['median'])}; ViT tiles in both {_f(h['vit']['pooled'])}; dense hot "
               f"spots kept {_f(m['hot_spots']['recall'])}; GMACs dense/pruned "
               f"{_f(c['gmacs_ratio'], 2)}")  # fmt: skip
    d = m.get("difference")
    if d:
        ci = d["auc_ci"]
        ci_text = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        click.echo(f"pruned - dense: AUC {_f(d['auc'])}{ci_text}, ECE {_f(d['ece'])}, Brier "
                   f"{_f(d['brier'])}, FROC {_f(d['froc'])}")
    r = m.get("lesion_recall")
    if r and r["triage"]:
        t = r["triage"]
        click.echo("triage area recall: " + ", ".join(
            f"{k} {_f(t[k]['area_recall'])} ({t[k]['lesions']})" for k in (*r["size_classes"],
                                                                            "all"))
            + f"; token recall in lesions {_f(r['tokens']['all']['recall'])}")
        ref = r.get("triage_dense_rank")
        if ref:
            click.echo("same tile budget, ranked by the dense heat: " + ", ".join(
                f"{k} {_f(ref[k]['area_recall'])}" for k in (*r["size_classes"], "all")))
