"""ROC and FROC plots (matplotlib, Agg), one curve or several labelled ones."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from wsi_prune.evaluation.froc import FP_RATES, FrocResult
from wsi_prune.evaluation.slide_metrics import SlideMetrics


def _figure(title: str, xlabel: str, ylabel: str):
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    fig = Figure(figsize=(5, 4.5), dpi=100)
    ax = fig.add_subplot()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.partial.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
    return path


def roc_figure(curves: SlideMetrics | Mapping[str, SlideMetrics]):
    """A matplotlib ``Figure`` of one or more ROC curves (``{name: metrics}``)."""
    if isinstance(curves, SlideMetrics):
        curves = {"run": curves}
    fig, ax = _figure("Slide-level ROC", "1 - specificity", "sensitivity")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    for name, m in curves.items():
        if m.auc is not None:
            # straight lines between roc_curve's points: a run of tied scores is one diagonal
            # segment, which a step plot would draw as a staircase
            ax.plot(m.fpr, m.tpr, label=f"{name} (AUC {m.auc:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    return fig


def roc_png(path: str | os.PathLike[str], curves: SlideMetrics | Mapping[str, SlideMetrics]
            ) -> Path:
    """Draw one or more ROC curves (``{name: metrics}``) into a PNG."""
    return _save(roc_figure(curves), Path(path))


def froc_png(path: str | os.PathLike[str], curves: FrocResult | Mapping[str, FrocResult]
             ) -> Path:
    """Draw one or more FROC curves (``{name: result}``) into a PNG, log FP axis."""
    if isinstance(curves, FrocResult):
        curves = {"run": curves}
    fig, ax = _figure("Lesion-level FROC (CAMELYON16)", "mean false positives per slide",
                      "lesion sensitivity")  # fmt: skip
    for name, r in curves.items():
        if r.average is not None:
            # beyond its last point the curve stays flat, as the interpolation reads it
            fp = np.append(np.maximum(r.curve_fp, 1 / 8), max(16.0, r.curve_fp[-1]))
            ax.plot(fp, np.append(r.curve_sensitivity, r.curve_sensitivity[-1]),
                    label=f"{name} (FROC {r.average:.3f})")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set(xlim=(1 / 8, 16), ylim=(0, 1.01))
    for rate in FP_RATES:
        ax.axvline(rate, color="grey", lw=0.5, ls=":")
    if any(r.average is not None for r in curves.values()):
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "FROC undefined: no annotated lesion", transform=ax.transAxes,
                ha="center", va="center")
    return _save(fig, Path(path))
