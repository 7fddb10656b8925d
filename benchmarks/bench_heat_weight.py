"""Choose ``mil.heat_vit_weight`` on training slides: how closely a pruned run's tile heat,
blended with the CNN tile score at each weight, follows the dense run's (issue 11).

The heat of a run made before its slide head was trained is not the heat a user sees (the
head was random). So the tile rankings are recomputed from what the stores hold that does not
depend on the head: each kept tile's ViT embedding times the tile head that ``train-vit`` (or
``distill-vit``) saved beside the ViT. That is exactly the ``tile-topk`` head's ranking: its
attention is ``sigmoid(tile logit)`` over the bag's sum. The pruned heat at weight ``w`` is
:func:`wsi_prune.outputs.heat.tile_heat` on those probabilities, the pipeline's own code, and
it is compared with the dense tile logits by Spearman over every tissue tile both runs hold,
per slide.

    python benchmarks/bench_heat_weight.py --dense W/seed0/train-dense \\
        --pruned W/seed0/train-b0.05-vit-scorer-e30-student-r0.0612 \\
        --dense-head W/seed0/vit.tile-head.safetensors \\
        --pruned-head W/seed0/vit-student-vit-scorer-e30.tile-head.safetensors

Use training runs to choose the weight; a test set's runs (with trained heads) only to report.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr
from safetensors.numpy import load_file
from scipy.stats import spearmanr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wsi_prune.evaluation.agreement import tile_keys  # noqa: E402
from wsi_prune.outputs.heat import tile_heat  # noqa: E402

#: weights tried when none are given
WEIGHTS = (0.0, 0.25, 0.5, 0.6, 0.75, 0.9, 1.0)


def load_head(path: Path) -> tuple[np.ndarray, float]:
    """``(weight (D,), bias)`` of a tile head file (``<vit>.tile-head.safetensors``)."""
    w = load_file(str(path))
    return w["weight"][0].astype(np.float64), float(w["bias"][0])


def tile_logits(g: zarr.Group, head: tuple[np.ndarray, float]) -> tuple[np.ndarray, np.ndarray]:
    """``(key (N,) int64, logit (N,) float64)`` of a slide store's tissue tiles: the tile
    head's logit of each ViT-embedded tile, NaN for tiles the ViT never saw. ``key`` is
    :func:`~wsi_prune.evaluation.agreement.tile_keys` of the level-0 corners."""
    xy = np.asarray(g["tiles/coords"][:], np.int64)
    logit = np.full(len(xy), np.nan)
    emb = np.asarray(g["vit/embedding"][:], np.float64)
    logit[np.asarray(g["vit/tile_index"][:])] = emb @ head[0] + head[1]
    return tile_keys(xy), logit


def blended_spearman(dense_logit: np.ndarray, pruned_logit: np.ndarray, tile_score: np.ndarray,
                     kept: np.ndarray, weights: Sequence[float] = WEIGHTS) -> dict[float, float]:
    """Spearman of the dense tile logits (N,) against the pruned heat at each weight.

    Args:
        dense_logit: (N,) the dense run's tile logits (every tile).
        pruned_logit: (N,) the pruned run's tile logits; only ``kept`` ones are read.
        tile_score: (N,) the pruned run's CNN tile scores in [0, 1].
        kept: (N,) bool, tiles that reached the pruned run's ViT.
    """
    att = 1.0 / (1.0 + np.exp(-pruned_logit[kept]))
    out = {}
    for w in weights:
        heat, _ = tile_heat(tile_score, kept, att / att.sum(), vit_weight=w)
        out[w] = float(spearmanr(dense_logit, heat).statistic)
    return out


def compare_runs(dense: Path, pruned: Path, dense_head: Path, pruned_head: Path,
                 weights: Sequence[float] = WEIGHTS) -> dict[str, dict[float, float]]:
    """Per slide id (the pruned run's stores): Spearman per weight."""
    out = {}
    hd, hp = load_head(dense_head), load_head(pruned_head)
    for store in sorted(pruned.glob("*.zarr")):
        if not (dense / store.name).is_dir():
            continue
        kd, ld = tile_logits(zarr.open_group(str(dense / store.name), mode="r"), hd)
        g = zarr.open_group(str(store), mode="r")
        kp, lp = tile_logits(g, hp)
        _, i, j = np.intersect1d(kd, kp, assume_unique=True, return_indices=True)
        kept = np.asarray(g["triage/kept"][:], bool)[j] & ~np.isnan(lp[j])
        score = np.asarray(g["triage/tile_score"][:], np.float64)[j]
        if kept.any() and np.isfinite(ld[i]).all():
            out[store.name[:-5]] = blended_spearman(ld[i], lp[j], score, kept, weights)
    return out


def table(per_slide: dict[str, dict[float, float]], weights: Sequence[float]) -> str:
    rows = ["| heat_vit_weight | median | min | slides < 0.9 |", "|---:|---:|---:|---:|"]
    for w in weights:
        v = np.array([s[w] for s in per_slide.values()])
        rows.append(f"| {w:g} | {np.median(v):.3f} | {v.min():.3f} | {(v < 0.9).sum()} "
                    f"of {len(v)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dense", type=Path, required=True, help="dense run folder (slide stores)")
    ap.add_argument("--pruned", type=Path, required=True, help="pruned run folder")
    ap.add_argument("--dense-head", type=Path, required=True,
                    help="tile head of the dense run's ViT (<vit>.tile-head.safetensors)")
    ap.add_argument("--pruned-head", type=Path, required=True,
                    help="tile head of the pruned run's ViT (the student's, if distilled)")
    ap.add_argument("--weights", type=float, nargs="+", default=list(WEIGHTS))
    args = ap.parse_args(argv)
    per = compare_runs(args.dense, args.pruned, args.dense_head, args.pruned_head, args.weights)
    if not per:
        print(f"no slide stores in both {args.dense} and {args.pruned}", file=sys.stderr)
        return 1
    print(table(per, args.weights))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
