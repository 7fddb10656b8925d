"""Fidelity benchmark (issue 11): does pruning keep the answer, on data a dense model does not
ace?

Data: two texture sets (:func:`wsi_prune.synth.write_texture_dataset`: real H&E texture from
``../shared/data``, CAMELYON16-sized lesions, a subtle tumour class and dense mimics), a
training set and a test set from different seeds. Models, trained here for every seed: the CNN
scorer on the training lesions (``train-scorer``), the 6-block ViT-Ti (``train-vit``, a time
budget; it also saves its tile head), and slide heads on the bags of the training slides:
gated ABMIL on the dense run (the dense reference's head, and the "dense-head" row) and per
budget on the pruned run at that budget ("as-infer": train as you infer), both Platt-scaled
on their out-of-fold logits; and ``tile-topk`` (the mean of the top-k tile lesion logits of
the ViT's tile head, k and calibration fitted on the slide labels) on the dense run and per
budget on the pruned run ("topk"). On the test set: the dense run with each head type (the
references), and per budget the pruned run with each head kind (``--heads``; the dense-trained
ABMIL only at ``--dense-head-budgets``); each compared with the dense run of its head type by
:func:`wsi_prune.evaluation.compare.compare_runs` (labels and lesion XML).

Budgets are shares of tissue tokens entering the ViT: the ``fraction`` tile policy keeps the
top ``budget / token_ratio`` of each slide's tissue tiles by CNN score and the CNN prior keeps
``token_ratio`` of their patches; the ViT prunes more inside (blocks 2 and 4, ratio 0.7).

``--adaptive`` budgets (default 5 %) are also run with the ``threshold`` tile policy: the CNN
score threshold that ``budget / token_ratio`` of the *training* slides' tiles pass, so the same
mean budget goes where the scorer sees lesion (a fixed fraction caps triage recall on a slide
whose lesion tiles outnumber it; ``triage_ceiling`` measures that cap).

``--student`` runs every pruned setting with a ViT distilled from the seed's ViT through the
pipeline's own pruning (``distill-vit``: train as you infer, for the ViT; settings tagged
``-student``), still compared with the dense runs of the seed's ViT.

``--scorer-targets vit`` adds, per seed, a scorer whose tile score learnt the order the dense
ViT's tile head gives the training slides' tiles (``train-scorer --tile-targets vit`` on the
dense training run; settings tagged ``-vit-scorer``; the adaptive threshold is then set on that
scorer's scores of the training tiles).

Every step is cached in ``--work`` (a file per finished step), so an interrupted benchmark
resumes. The summary (``summary.json``, ``summary.md``, ``budget.png``) aggregates the seeds:
mean, and min-max over seeds; ΔAUC also gets each seed's paired bootstrap CI, and ΔAUC, ΔECE
and ΔBrier a CI of their mean over seeds (:func:`seed_mean`).

    python benchmarks/bench_fidelity.py --work bench-out/fidelity            # the full run
    python benchmarks/bench_fidelity.py --work /tmp/f --quick                # a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from wsi_prune.config import RunConfig
from wsi_prune.evaluation.compare import compare_runs
from wsi_prune.evaluation.runs import _ok_rows, run_labels
from wsi_prune.evaluation.seeds import seed_mean_differences
from wsi_prune.io.labels import read_labels
from wsi_prune.models.factory import apply_trained_configs
from wsi_prune.pipeline.batch import run_batch
from wsi_prune.training.distill import DEFAULT_KEEP_RATIOS, distill_vit
from wsi_prune.training.mil import train_mil
from wsi_prune.training.scorer import train_scorer
from wsi_prune.training.vit import DEFAULT_VIT, train_vit

REPO = Path(__file__).resolve().parents[1]
_log = logging.getLogger("bench_fidelity")

#: the pipeline around the trained models (pipelines/fidelity.yaml holds the same)
BASE = {
    "tiling": {"mpp": 0.5, "tile_px": 224, "coarse_factor": 4, "tissue_threshold": 0.25},
    "scorer": {"model": "mobilenetv3_small_100", "feature_levels": [1, 4], "batch_size": 128},
    "tile_select": {"policy": "fraction", "fraction": 0.1, "min_tiles": 8, "max_tiles": None},
    "token_select": {"policy": "ratio", "keep_ratio": 0.5},
    "vit": {"model": DEFAULT_VIT.model, "model_kwargs": dict(DEFAULT_VIT.model_kwargs),
            "prune_blocks": [2, 4], "prune_policy": "ratio", "keep_ratio": 0.7,
            "batch_size": 32},
    "mil": {"hidden": 64},
}


def budget_config(cfg: RunConfig, budget: float, token_ratio: float,
                  scope: str = "tile") -> RunConfig:
    """``cfg`` keeping ``budget`` of the tissue tokens: the top ``budget / token_ratio`` of the
    tissue tiles, ``token_ratio`` of their patches (each tile's, or of them all with
    ``scope="slide"``: ``token_select.scope``)."""
    return cfg.replace(tile_select={"policy": "fraction", "fraction": min(1.0, budget /
                                                                            token_ratio)},
                       token_select={"policy": "ratio", "keep_ratio": token_ratio,
                                     "scope": scope})


def _done(path: Path) -> bool:
    return path.is_file()


def _mark(path: Path, payload: Any = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload if payload is not None else {}, indent=1, default=str))


def _run(slides: Path, out: Path, cfg: RunConfig) -> list[dict[str, Any]]:
    """``run_batch`` once (skipped when ``out/.bench-done`` exists); failed slides stop the
    benchmark, since a comparison over different slide sets would be wrong."""
    flag = out / ".bench-done"
    if _done(flag):
        return json.loads(flag.read_text())
    t = time.perf_counter()
    rows = run_batch([slides], out, cfg, progress=False)
    bad = [r for r in rows if r["status"] == "failed"]
    if bad:
        raise SystemExit(f"{out}: {len(bad)} slide(s) failed: {bad[0]['error']}")
    _log.info("%s: %d slides in %.0f s", out, len(rows), time.perf_counter() - t)
    _mark(flag, rows)
    return rows


def make_data(work: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    from wsi_prune.synth import write_texture_dataset

    sets = {"train": (args.n_train, args.train_seed), "test": (args.n_test, args.test_seed)}
    dirs = {}
    for name, (n, seed) in sets.items():
        d = work / "data" / name
        if not _done(d / ".bench-done"):
            t = time.perf_counter()
            write_texture_dataset(d, n_tumour=n // 2, n_normal=n - n // 2, size=args.size,
                                  seed=seed, difficulty=args.difficulty, workers=2)
            _log.info("%s set: %d slides in %.0f s", name, n, time.perf_counter() - t)
            _mark(d / ".bench-done")
        dirs[name] = d
    return dirs["train"], dirs["test"]


def train_models(work: Path, train_dir: Path, base: RunConfig, seed: int,
                 args: argparse.Namespace) -> RunConfig:
    """Scorer and ViT of one seed; returns ``base`` pointing at them."""
    sd = work / f"seed{seed}"
    tiles = work / "train-tiles"
    if not _done(tiles / ".bench-done"):
        from wsi_prune.io.tiling import tile_slide
        from wsi_prune.pipeline.inputs import discover

        for e in discover([train_dir]):
            tile_slide(e.path, tiles / f"{e.id}.zarr", base)
        _mark(tiles / ".bench-done")
    scorer_w, vit_w = sd / "scorer.safetensors", sd / "vit.safetensors"
    if not scorer_w.is_file():
        t = time.perf_counter()
        train_scorer([tiles], train_dir, scorer_w, config=base.scorer, epochs=args.scorer_epochs,
                     max_tiles_per_store=512, seed=seed, progress=False)
        _log.info("seed %d: scorer trained in %.0f s", seed, time.perf_counter() - t)
    if not vit_w.is_file():
        res = train_vit([tiles], train_dir, vit_w, config=base.vit, tiling=base.tiling,
                        epochs=args.vit_epochs, max_minutes=args.vit_minutes,
                        max_tiles_per_store=args.vit_tiles, seed=seed, progress=False)
        _log.info("seed %d: ViT trained in %.0f s (%d epochs), val %s", seed, res.seconds,
                  len(res.losses), res.val)
    return apply_trained_configs(base.replace(scorer={"weights": str(scorer_w)},
                                              vit={"weights": str(vit_w)}))


def train_head(run_dir: Path, labels: Path, out: Path, seed: int,
               model: str = "gated-abmil") -> Path:
    """A slide head on the bags of ``run_dir``: gated-ABMIL, or tile-topk fitted from the tile
    head train-vit saved beside the run's ViT."""
    if not out.is_file():
        res = train_mil([run_dir], labels, out, folds=4, lr=1e-3, patience=20, epochs=150,
                        hidden=64, model=model, seed=seed, progress=False)
        _log.info("%s: MIL %s %s, fold AUC %s", out.name, model, res.regime, res.fold_auc)
    return out


def one_seed(work: Path, train_dir: Path, test_dir: Path, base: RunConfig, seed: int,
             args: argparse.Namespace) -> dict[str, Any]:
    sd = work / f"seed{seed}"
    cfg = train_models(work, train_dir, base, seed, args)
    _run(train_dir, sd / "train-dense", cfg.dense())
    head_dense = train_head(sd / "train-dense", train_dir / "labels.csv",
                            sd / "mil-dense.safetensors", seed)
    if set(args.heads) - {"topk", "dense-topk"} or args.ablate_levels:  # the ABMIL heads' reference
        _run(test_dir, sd / "test-dense",
             cfg.dense().replace(mil={"weights": str(head_dense)}))
    if {"topk", "dense-topk"} & set(args.heads):
        topk = train_head(sd / "train-dense", train_dir / "labels.csv",
                          sd / "mil-dense-topk.safetensors", seed, "tile-topk")
        _run(test_dir, sd / "test-dense-topk", apply_trained_configs(
            cfg.dense().replace(mil={"weights": str(topk)})))
    out: dict[str, Any] = {}
    for targets in args.scorer_targets:
        c, sfx = cfg, ""
        if targets == "vit":
            c, sfx = vit_scorer(sd, train_dir, cfg, seed, args), VIT_SCORER + epochs_tag(args)
        if args.student:
            c, sfx = student_vit(sd, c, seed, args, sfx), sfx + STUDENT + student_tag(args)
        rt = ratio_tag(args.token_ratio, args.token_scope)
        if args.neighbour_mix:
            c = c.replace(tile_select={"neighbour_mix": args.neighbour_mix})
            rt += f"-nm{args.neighbour_mix:g}"
        for b in args.budgets:
            out.update(pruned_setting(sd, train_dir, test_dir, f"b{b:g}{sfx}{rt}",
                                      budget_config(c, b, args.token_ratio, args.token_scope),
                                      head_dense, seed,
                                      _heads(args, b) if not sfx else _no_dense_head(args),
                                      args.drop_stores, args.heat_vit_weight))
        for b in args.adaptive:
            out.update(adaptive_budget(sd, train_dir, test_dir, c, head_dense, b, seed, args,
                                       sfx, rt))
    if seed == args.seeds[0] and args.ablate_levels:
        out.update(ablate_scorer_levels(work, train_dir, test_dir, cfg, seed, args))
    return out



#: tag suffix of the settings whose scorer learnt the dense ViT's tile probabilities
VIT_SCORER = "-vit-scorer"
#: tag suffix of the settings whose pruned runs use the ViT distilled for pruning
STUDENT = "-student"


def student_tag(args: argparse.Namespace) -> str:
    """'' for the default distillation ratios (``distill.DEFAULT_KEEP_RATIOS``), else ``-sr``
    and the ratios."""
    ratios = tuple(float(r) for r in args.student_ratios)
    return "" if ratios == DEFAULT_KEEP_RATIOS else "-sr" + "_".join(f"{r:g}" for r in ratios)
#: the CNN prior's share of each kept tile's patches that the tags leave unsaid
DEFAULT_TOKEN_RATIO = 0.5


def ratio_tag(token_ratio: float, scope: str = "tile") -> str:
    """Tag suffix of a token ratio other than the default: ``-r0.25`` keeps a quarter of each
    kept tile's patches, so the same budget keeps twice the tiles (a wider triage); ``-slide``
    when the ratio counts over the slide's kept tiles (``token_select.scope: slide``)."""
    tag = "" if abs(token_ratio - DEFAULT_TOKEN_RATIO) < 1e-9 else f"-r{token_ratio:g}"
    return tag + ("-slide" if scope == "slide" else "")


def epochs_tag(args: argparse.Namespace) -> str:
    """Tag suffix of a ViT-taught scorer trained for other than ``--scorer-epochs`` epochs
    (``-e30``); empty otherwise, so earlier runs keep their tags and weights."""
    n = args.vit_scorer_epochs
    return "" if n is None or n == args.scorer_epochs else f"-e{n}"


def vit_scorer(sd: Path, train_dir: Path, cfg: RunConfig, seed: int,
               args: argparse.Namespace) -> RunConfig:
    """``cfg`` with a scorer whose tile score learnt the dense ViT's tile lesion probabilities
    on the dense run of the training slides (``train-scorer --tile-targets vit``; patch targets
    stay the lesion annotations)."""
    w = sd / f"scorer-vit{epochs_tag(args)}.safetensors"
    if not w.is_file():
        t = time.perf_counter()
        train_scorer([sd / "train-dense"], train_dir, w, tile_teacher=True, config=cfg.scorer,
                     epochs=args.vit_scorer_epochs or args.scorer_epochs,
                     max_tiles_per_store=512, seed=seed, tile_loss_weight=args.teacher_weight,
                     progress=False)
        _log.info("seed %d: ViT-taught scorer trained in %.0f s", seed, time.perf_counter() - t)
    return apply_trained_configs(cfg.replace(scorer={"weights": str(w)}))


def student_vit(sd: Path, cfg: RunConfig, seed: int, args: argparse.Namespace,
                sfx: str) -> RunConfig:
    """``cfg`` with the seed's ViT replaced, for the pruned runs, by a student distilled from it
    (``distill-vit`` on the dense training run: the pipeline's pruning with ``cfg``'s scorer as
    the CNN prior, token ratios 1, 0.5, 0.25 and 0.125). The dense references stay the
    teacher's runs: a pruned setting is compared with the answer of the ViT it was distilled
    from."""
    w = sd / f"vit-student{sfx}{student_tag(args)}.safetensors"
    if not w.is_file():
        res = distill_vit([sd / "train-dense"], w, cfg, max_minutes=args.student_minutes,
                          seed=seed, progress=False, keep_ratios=args.student_ratios)
        _log.info("seed %d: student distilled in %.0f s (%d epochs), val %s", seed, res.seconds,
                  len(res.losses), res.val)
    return apply_trained_configs(cfg.replace(vit={"weights": str(w)}))


def _no_dense_head(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(k for k in args.heads if k != "dense-head")


def _heads(args: argparse.Namespace, budget: float) -> tuple[str, ...]:
    """Head kinds run at ``budget``: every kind of ``--heads`` at the budgets of
    ``--dense-head-budgets`` (the dense-trained head is the trap of issue 11, shown where
    asked), the others everywhere."""
    return tuple(k for k in args.heads if k != "dense-head" or any(
        abs(budget - b) < 1e-9 for b in args.dense_head_budgets))


def pruned_setting(sd: Path, train_dir: Path, test_dir: Path, tag: str, cb: RunConfig,
                   head_dense: Path, seed: int,
                   kinds: tuple[str, ...] = ("as-infer", "dense-head"),
                   drop_stores: bool = False, heat_vit_weight: float = 1.0) -> dict[str, Any]:
    """One pruned setting ``cb``: its run on the training slides, heads trained on that run
    (train as you infer), then the test slides with each head kind, compared with the dense
    test run of the same head type: ``as-infer`` (gated-ABMIL trained on the pruned run),
    ``dense-head`` (gated-ABMIL trained on the dense run), ``topk`` (tile-topk fitted on the
    pruned run, against the dense run with tile-topk fitted on the dense run), ``dense-topk``
    (the dense run's own tile-topk head, unchanged: it reads only the bag's top tiles, so it
    needs no refit when the kept tiles are those; with ``--student`` it reads the student's
    tile logits, which were distilled to be the teacher's). ``drop_stores`` deletes each test
    run's slide stores once compared (:func:`drop_slide_stores`). ``heat_vit_weight`` < 1 sets
    ``mil.heat_vit_weight`` of the test runs (tags gain ``-hv<w>``: :func:`heat_tag`); it changes
    no embedding or probability, so the training run and heads of the setting are reused."""
    _run(train_dir, sd / f"train-{tag}", cb)
    labels = train_dir / "labels.csv"
    heads = {}
    if "as-infer" in kinds:
        heads["as-infer"] = train_head(sd / f"train-{tag}", labels,
                                       sd / f"mil-{tag}.safetensors", seed)
    if "dense-head" in kinds:
        heads["dense-head"] = head_dense
    if "topk" in kinds:
        heads["topk"] = train_head(sd / f"train-{tag}", labels,
                                   sd / f"mil-{tag}-topk.safetensors", seed, "tile-topk")
    if "dense-topk" in kinds:
        heads["dense-topk"] = sd / "mil-dense-topk.safetensors"
    out: dict[str, Any] = {}
    hv = heat_tag(heat_vit_weight)
    for kind, w in heads.items():
        run_dir = sd / f"test-{tag}{hv}-{kind}"
        _run(test_dir, run_dir, apply_trained_configs(cb.replace(
            mil={"weights": str(w), "heat_vit_weight": heat_vit_weight})))
        cmp = sd / f"cmp-{tag}{hv}-{kind}"
        ref = sd / ("test-dense-topk" if kind in ("topk", "dense-topk") else "test-dense")
        if not _done(cmp / "metrics.json"):
            compare_runs(ref, run_dir, cmp, test_dir / "labels.csv", test_dir,
                         n_boot=2000, seed=seed)
        m = json.loads((cmp / "metrics.json").read_text())
        m["triage_ceiling"] = triage_ceiling(m, run_dir)
        out[f"{tag}{hv}/{kind}"] = m
        if drop_stores:
            drop_slide_stores(run_dir)
    return out


def heat_tag(heat_vit_weight: float) -> str:
    """``-hv<w>`` for a heat blended with the CNN score (``mil.heat_vit_weight`` < 1), else
    empty, so earlier runs keep their tags."""
    return "" if heat_vit_weight == 1.0 else f"-hv{heat_vit_weight:g}"


def drop_slide_stores(run_dir: Path) -> int:
    """Delete the slide stores of a compared test run, keeping ``predictions.csv``, the
    manifest and the viewer outputs (a 64-slide run's stores are ~1.2 GB; the comparison's
    ``metrics.json`` holds what the tables need). Returns the stores deleted."""
    import shutil

    stores = sorted(run_dir.glob("*.zarr"))
    for z in stores:
        shutil.rmtree(z)
    return len(stores)

def score_threshold(train_run: Path, share: float, scorer: RunConfig | None = None) -> float:
    """The CNN tile score above which ``share`` of the training slides' tissue tiles lie
    (pooled over the slides of a run that scored every tile: the dense training run). With
    ``scorer``, the tiles are scored again by that config's scorer instead of read back."""
    import zarr

    from wsi_prune.models.scorer import build_scorer, score_tiles, trained_scorer_config

    model = None
    if scorer is not None:
        model = build_scorer(*trained_scorer_config(scorer.scorer.weights, scorer.scorer))
    scores = []
    for z in sorted(train_run.glob("*.zarr")):
        g = zarr.open_group(str(z), mode="r")
        scores.append(np.asarray(g["triage/tile_score"][...]) if model is None else
                      score_tiles(model, g["tiles/coarse"], 256).tile.numpy())
    return float(np.quantile(np.concatenate(scores), 1.0 - share))


def adaptive_budget(sd: Path, train_dir: Path, test_dir: Path, cfg: RunConfig, head_dense: Path,
                    budget: float, seed: int, args: argparse.Namespace, sfx: str = "",
                    rt: str = "") -> dict[str, Any]:
    """The same mean budget spent where the scorer sees lesion: every tile whose CNN score
    passes a threshold set on the *training* slides so that ``budget / token_ratio`` of their
    tiles pass (tumour slides get more tiles, normal slides fewer; at least ``min_tiles``)."""
    t = score_threshold(sd / "train-dense", budget / args.token_ratio, cfg if sfx else None)
    cb = budget_config(cfg, budget, args.token_ratio, args.token_scope).replace(
        tile_select={"policy": "threshold", "threshold": t, "max_tiles": None})
    # the dense-trained head's trap is shown at the fixed budgets; here only heads as inferred
    out = pruned_setting(sd, train_dir, test_dir, f"b{budget:g}-adaptive{sfx}{rt}", cb, head_dense,
                         seed, _no_dense_head(args), args.drop_stores)
    for m in out.values():
        m["threshold"] = t
    return out

def triage_ceiling(metrics: dict[str, Any], run_dir: Path) -> dict[str, float | int]:
    """The best lesion-tile recall any triage could reach with the tiles this run kept: per
    slide ``min(lesion tiles, kept tiles)``, pooled over slides, against the recall reached.
    A budget that keeps fewer tiles than a slide has lesion tiles caps recall below 1 whatever
    the scorer."""
    import csv

    with open(run_dir / "predictions.csv", newline="") as fh:
        kept = {r["id"]: int(r["kept_tiles"] or 0) for r in csv.DictReader(fh)}
    per = metrics.get("lesion_recall", {}).get("per_slide", {})
    lesion = {sid: int(v["triage"]["all"]["tiles"]) for sid, v in per.items()
              if v.get("triage", {}).get("all")}
    total = sum(lesion.values())
    best = sum(min(n, kept.get(sid, 0)) for sid, n in lesion.items())
    got = sum(int(per[sid]["triage"]["all"]["tiles_kept"]) for sid in lesion)
    return {"lesion_tiles": total, "tile_recall": got / total if total else float("nan"),
            "ceiling": best / total if total else float("nan"), "slides": len(lesion)}


def ablate_scorer_levels(work: Path, train_dir: Path, test_dir: Path, cfg: RunConfig, seed: int,
                         args: argparse.Namespace) -> dict[str, Any]:
    """Issue 11 §6: the same budget with the old 7×7 patch map (feature levels 2, 4, upsampled
    to 14×14) against the default true 14×14 map (levels 1, 4): triage and token recall inside
    lesions. The MIL head does not enter recall, so the dense head is reused."""
    sd = work / f"seed{seed}"
    levels = [int(v) for v in args.ablate_levels.split(",")]
    w = sd / f"scorer-levels{''.join(map(str, levels))}.safetensors"
    scorer_cfg = dataclasses.replace(cfg.scorer, weights=None, feature_levels=tuple(levels))
    if not w.is_file():
        train_scorer([work / "train-tiles"], train_dir, w, config=scorer_cfg,
                     epochs=args.scorer_epochs, max_tiles_per_store=512, seed=seed,
                     progress=False)
    b = 0.05 if 0.05 in args.budgets else args.budgets[0]
    tag = f"b{b:g}"
    alt = apply_trained_configs(budget_config(cfg, b, args.token_ratio).replace(
        scorer={"weights": str(w), "feature_levels": tuple(levels)},
        mil={"weights": str(sd / "mil-dense.safetensors")}))
    run_dir = sd / f"test-{tag}-levels{''.join(map(str, levels))}"
    _run(test_dir, run_dir, alt)
    cmp = sd / f"cmp-{tag}-levels{''.join(map(str, levels))}"
    if not _done(cmp / "metrics.json"):
        compare_runs(sd / "test-dense", run_dir, cmp, test_dir / "labels.csv", test_dir,
                     n_boot=200, seed=seed)
    return {f"{tag}/levels{''.join(map(str, levels))}":
            json.loads((cmp / "metrics.json").read_text())}


# -- summary -------------------------------------------------------------------------------------
def _get(m: dict[str, Any], *keys: str) -> float | None:
    for k in keys:
        if not isinstance(m, dict) or m.get(k) is None:
            return None
        m = m[k]
    return float(m) if isinstance(m, (int, float)) else None


ROWS = {
    "tokens": ("cost", "pruned", "token_fraction_mean"),
    "auc_dense": ("evaluation", "dense", "slide_level", "auc"),
    "auc_pruned": ("evaluation", "pruned", "slide_level", "auc"),
    "d_auc": ("difference", "auc"),
    "d_froc": ("difference", "froc"),
    "d_sens95": ("difference", "at_95_specificity", "delta_sensitivity"),
    "d_ece": ("difference", "ece"),
    "d_brier": ("difference", "brier"),
    "d_prob": ("probability", "mean_abs_diff"),
    "label_agreement": ("probability", "label_agreement"),
    "triage_macro": ("lesion_recall", "triage", "macro", "area_recall"),
    "triage_micro": ("lesion_recall", "triage", "micro", "area_recall"),
    # the same tile budget ranked by the dense run's tile heat: what imitating the dense model
    # can reach at best
    "dense_rank_macro": ("lesion_recall", "triage_dense_rank", "macro", "area_recall"),
    "dense_rank_micro": ("lesion_recall", "triage_dense_rank", "micro", "area_recall"),
    "token_recall": ("lesion_recall", "tokens", "all", "recall"),
    "triage_tiles": ("triage_ceiling", "tile_recall"),
    "triage_ceiling": ("triage_ceiling", "ceiling"),
    "spearman_all": ("heatmap", "all", "median"),
    "speedup": ("cost", "speedup"),
}


def seed_mean(runs: list[tuple[Path, Path]], labels: dict[str, int], n_boot: int = 2000
              ) -> dict[str, Any] | None:
    """ΔAUC, ΔECE and ΔBrier averaged over seeds with one paired bootstrap over the slides
    (:func:`~wsi_prune.evaluation.seeds.seed_mean_differences`), from each seed's (dense,
    pruned) run folders; on the labelled slides with a result in every run, None with fewer
    than two seeds or no such slide."""
    if len(runs) < 2:
        return None
    probs = [[{i: float(r["probability"]) for i, r in _ok_rows(Path(d))[0].items()}
              for d in pair] for pair in runs]
    ids = set.intersection(*(set(p) for pair in probs for p in pair))
    known = run_labels(labels, sorted(ids))
    ids_l = sorted(known)
    if not ids_l:
        return None
    return seed_mean_differences([known[i] for i in ids_l],
                                 [[d[i] for i in ids_l] for d, _ in probs],
                                 [[p[i] for i in ids_l] for _, p in probs], n_boot=n_boot)


def summarise(per_seed: dict[int, dict[str, Any]], labels: dict[str, int] | None = None
              ) -> dict[str, Any]:
    """Per setting: mean, min and max over seeds of each of ``ROWS``, each seed's CIs, the
    test set's counts and, with ``labels``, ``seed_mean`` (:func:`seed_mean`)."""
    keys = sorted({k for m in per_seed.values() for k in m})
    out: dict[str, Any] = {}
    for k in keys:
        row: dict[str, Any] = {}
        for name, path in ROWS.items():
            vals = [v for m in per_seed.values() if k in m
                    if (v := _get(m[k], *path)) is not None]
            row[name] = {"mean": float(np.mean(vals)), "min": float(np.min(vals)),
                         "max": float(np.max(vals)), "n": len(vals)} if vals else None
        for ci in ("auc_ci", "ece_ci", "brier_ci"):
            row[f"d_{ci}"] = [m[k]["difference"].get(ci) for m in per_seed.values()
                              if k in m and m[k].get("difference")]
        first = next(m[k] for m in per_seed.values() if k in m)
        row["counts"] = {"slides": (first.get("difference") or {}).get("n_slides"),
                         "lesions": {c: (first.get("lesion_recall", {}).get("triage", {})
                                         .get(c, {}) or {}).get("lesions")
                                     for c in ("itc", "micro", "macro")}}
        runs = [(Path(m[k]["dense"]), Path(m[k]["pruned"])) for m in per_seed.values()
                if k in m and m[k].get("dense") and m[k].get("pruned")]
        row["seed_mean"] = seed_mean(runs, labels) if labels else None
        out[k] = row
    return out


def _cell(s: dict[str, float] | None, digits: int = 3, pct: bool = False) -> str:
    if not s:
        return "n/a"
    f = (lambda v: f"{100 * v:.1f} %") if pct else (lambda v: f"{v:.{digits}f}")
    return f"{f(s['mean'])} [{f(s['min'])}, {f(s['max'])}]" if s["n"] > 1 else f(s["mean"])


def markdown(summary: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"Seeds {args.seeds}; cells: mean [min, max] over seeds. Budget = tissue tokens "
        f"entering the ViT (token ratio {args.token_ratio}).", "",
        "| setting | tokens | AUC dense | AUC pruned | ΔAUC | ΔFROC | Δsens@95 %spec | ΔECE | "
        "ΔBrier | mean \\|Δp\\| | label agreement | triage recall macro / micro area | "
        "same budget ranked by the dense heat: macro / micro | "
        "lesion tiles kept / at most | lesion token recall | heat Spearman (all tiles, median) | "
        "speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, r in summary.items():
        lines.append(
            f"| {k} | {_cell(r['tokens'], pct=True)} | {_cell(r['auc_dense'])} | "
            f"{_cell(r['auc_pruned'])} | {_cell(r['d_auc'])} | {_cell(r['d_froc'])} | "
            f"{_cell(r['d_sens95'])} | {_cell(r['d_ece'])} | {_cell(r['d_brier'], 4)} | "
            f"{_cell(r['d_prob'])} | {_cell(r['label_agreement'])} | "
            f"{_cell(r['triage_macro'])} / {_cell(r['triage_micro'])} | "
            f"{_cell(r['dense_rank_macro'])} / {_cell(r['dense_rank_micro'])} | "
            f"{_cell(r['triage_tiles'])} / {_cell(r['triage_ceiling'])} | "
            f"{_cell(r['token_recall'])} | {_cell(r['spearman_all'])} | "
            f"{_cell(r['speedup'], 1) + ('×' if r['speedup'] else '')} |")
    lines += ["", "Paired bootstrap 95 % CIs of ΔAUC per seed:"]
    lines += [f"- {k}: {r['d_auc_ci']}" for k, r in summary.items()]
    lines += ["", "Paired bootstrap 95 % CIs of ΔECE and ΔBrier per seed (where compared with "
              "them):"]
    lines += [f"- {k}: ECE {r['d_ece_ci']}, Brier {r['d_brier_ci']}" for k, r in summary.items()]
    means = {k: r["seed_mean"] for k, r in summary.items() if r.get("seed_mean")}
    if means:
        lines += ["", "Mean over seeds with a paired 95 % CI of that mean (the test slides "
                  "resampled once per round, the same resample for every seed):", "",
                  "| setting | seeds | slides | ΔAUC | ΔECE | ΔBrier |",
                  "|---|---|---|---|---|---|"]
        for k, s in means.items():
            cells = [f"{s[n]:+.{d}f} [{s[n + '_ci'][0]:+.{d}f}, {s[n + '_ci'][1]:+.{d}f}]"
                     if s[n] is not None and s[n + "_ci"] else "n/a"
                     for n, d in (("auc", 3), ("ece", 3), ("brier", 4))]
            lines.append(f"| {k} | {s['n_seeds']} | {s['n_slides']} | {' | '.join(cells)} |")
    first = next(iter(summary.values()), None)
    if first:
        lines += ["", f"Test set: {first['counts']['slides']} slides; lesions by class "
                      f"{first['counts']['lesions']}."]
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in ((axes[0], "auc_pruned", "slide AUC"),
                              (axes[1], "d_froc", "ΔFROC (pruned − dense)")):
        for kind, style in (("topk", "^-"), ("as-infer", "o-"), ("dense-head", "s--")):
            # the fixed-fraction budgets only: adaptive rows spend tokens differently
            pts = sorted((r["tokens"]["mean"], r[metric]["mean"]) for k, r in summary.items()
                         if k.endswith(kind) and "adaptive" not in k and r["tokens"]
                         and VIT_SCORER not in k
                         and r[metric])
            if pts:
                ax.plot([100 * x for x, _ in pts], [y for _, y in pts], style,
                        label=f"pruned, head {kind}")
        if metric == "auc_pruned":  # one dense reference per head type
            for name, topk, ls in (("ABMIL", False, "-"), ("tile-topk", True, ":")):
                dense = [r["auc_dense"]["mean"] for k, r in summary.items()
                         if r["auc_dense"] and k.endswith("topk") == topk]
                if dense:
                    ax.axhline(float(np.mean(dense)), color="k", lw=1, ls=ls,
                               label=f"dense, {name}")
        ax.set_xlabel("tissue tokens entering the ViT (%)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``--quick`` already applied)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=REPO / "bench-out" / "fidelity")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.02, 0.05, 0.10])
    ap.add_argument("--token-ratio", type=float, default=DEFAULT_TOKEN_RATIO,
                    help="share of each kept tile's patches the CNN prior lets in: a budget "
                         "keeps budget / token_ratio of the tiles (tags end in -r<ratio> "
                         "when it is not the default)")
    ap.add_argument("--token-scope", choices=["tile", "slide"], default="tile",
                    help="token_select.scope of the pruned settings (tags end in -slide)")
    ap.add_argument("--neighbour-mix", type=float, default=0.0,
                    help="tile_select.neighbour_mix of the pruned settings (tags end in "
                         "-nm<mix>)")
    ap.add_argument("--heat-vit-weight", type=float, default=1.0,
                    help="mil.heat_vit_weight of the pruned test runs: the ViT's share of a kept "
                         "tile's heat, the rest the CNN score's (tags end in -hv<w>; training "
                         "runs and heads are reused)")
    ap.add_argument("--adaptive", type=float, nargs="*", default=[0.05],
                    help="budgets also run with a score threshold set on the training slides "
                         "(the mean budget, spent where the scorer sees lesion)")
    ap.add_argument("--n-train", type=int, default=24)
    ap.add_argument("--n-test", type=int, default=32)
    ap.add_argument("--size", type=int, default=12288)
    ap.add_argument("--difficulty", type=float, default=0.75)
    ap.add_argument("--train-seed", type=int, default=101)
    ap.add_argument("--test-seed", type=int, default=202)
    ap.add_argument("--scorer-epochs", type=int, default=10)
    ap.add_argument("--vit-scorer-epochs", type=int, default=None,
                    help="epochs of the ViT-taught scorer (default --scorer-epochs; tags end in "
                         "-e<n> when they differ)")
    ap.add_argument("--vit-epochs", type=int, default=12)
    ap.add_argument("--vit-minutes", type=float, default=20.0)
    ap.add_argument("--vit-tiles", type=int, default=256)
    ap.add_argument("--heads", nargs="+", default=["topk", "as-infer", "dense-head"],
                    choices=["topk", "as-infer", "dense-head", "dense-topk"],
                    help="slide heads compared at every budget (see pruned_setting)")
    ap.add_argument("--dense-head-budgets", type=float, nargs="*", default=[0.05],
                    help="budgets at which the dense-trained gated-ABMIL head is also run")
    ap.add_argument("--scorer-targets", nargs="+", default=["lesions"],
                    choices=["lesions", "vit"],
                    help="scorers run at every budget: trained on the lesions, and/or with its "
                         "tile score taught by the dense ViT's tile head (tags end in "
                         f"{VIT_SCORER})")
    ap.add_argument("--student", action="store_true",
                    help="pruned runs use a ViT distilled from the seed's ViT for pruning "
                         f"(distill-vit; tags end in {STUDENT}); the dense references stay")
    ap.add_argument("--student-minutes", type=float, default=12.0,
                    help="time budget of each distillation")
    ap.add_argument("--student-ratios", type=float, nargs="+", default=list(DEFAULT_KEEP_RATIOS),
                    help="CNN-prior token ratios the student is distilled at (other than the "
                         "default: tags gain -sr<ratios>)")
    ap.add_argument("--teacher-weight", type=float, default=1.0,
                    help="tile-loss weight of the ViT-taught scorer")
    ap.add_argument("--ablate-levels", default="2,4",
                    help="scorer feature levels to compare with the default (1,4); '' skips")
    ap.add_argument("--drop-stores", action="store_true",
                    help="delete each pruned test run's slide stores once it is compared "
                         "(~1.2 GB per 64-slide run; predictions, manifest and metrics stay)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 4+4 slides of 4096², one seed, one budget, 1-min ViT")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.budgets, args.n_train, args.n_test = [0], [0.1], 4, 4
        args.size, args.vit_minutes, args.vit_tiles, args.scorer_epochs = 4096, 1.0, 48, 2
        args.student_minutes = 1.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("wsi_prune").setLevel(logging.WARNING)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_dir, test_dir = make_data(args.work, args)
    base = RunConfig.from_dict(BASE)
    per_seed = {}
    for seed in args.seeds:
        per_seed[seed] = one_seed(args.work, train_dir, test_dir, base, seed, args)
    summary = summarise(per_seed, read_labels(test_dir / "labels.csv"))
    (args.work / "summary.json").write_text(json.dumps(summary, indent=1))
    text = markdown(summary, args)
    (args.work / "summary.md").write_text(text + "\n")
    plot(summary, args.work / "budget.png")
    print(text)
    print(f"\n{math.ceil(time.perf_counter() - t0)} s in all (os.cpu_count() = {os.cpu_count()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
