"""Pruned vs dense on a synthetic CAMELYON-like benchmark (issue: training and evaluation).

Steps, all through the package's public functions:

1. write a training and a test set of synthetic slides (about half with tumour, ASAP XML
   lesion annotations, labels.csv);
2. tile the training slides and train the CNN scorer from the lesion annotations;
3. run the *dense* pipeline (every tissue tile, every token) on the training slides and train
   the gated ABMIL head on its embeddings;
4. run the dense pipeline and the pruned pipeline at several keep settings on the test slides,
   with the same weights, timing each run end to end (tiling included);
5. evaluate each run (AUC with bootstrap CI, FROC) and compare each pruned run with the dense
   one (probability agreement, heatmap Spearman, tokens and GMACs spent).

Prints a results table and writes ``OUT/results.md`` (for docs/benchmarks.md) and
``OUT/budget.png`` (accuracy versus token budget). Not a test: it takes tens of minutes.

    python benchmarks/bench_end_to_end.py --out bench-out/e2e
    python benchmarks/bench_end_to_end.py --out bench-out/e2e-small --n-train 8 --n-test 8 --tiny
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import time
from pathlib import Path

import psutil

from wsi_prune.config import RunConfig
from wsi_prune.pipeline.batch import run_batch

#: pruned keep settings: name -> config overrides
SETTINGS = {
    "keep-A": {"tile_select": {"policy": "nucleus", "p": 0.5, "min_tiles": 4},
               "token_select": {"policy": "ratio", "keep_ratio": 0.25},
               "vit": {"prune_policy": "ratio", "keep_ratio": 0.7}},
    "keep-B": {"tile_select": {"policy": "nucleus", "p": 0.3, "min_tiles": 4},
               "token_select": {"policy": "ratio", "keep_ratio": 0.25},
               "vit": {"prune_policy": "ratio", "keep_ratio": 0.7}},
    "keep-C": {"tile_select": {"policy": "nucleus", "p": 0.7, "min_tiles": 4},
               "token_select": {"policy": "ratio", "keep_ratio": 0.5},
               "vit": {"prune_policy": "ratio", "keep_ratio": 0.7}},
}


def base_config(tiny: bool, vit: str) -> RunConfig:
    vit_cfg = {"model": vit, "batch_size": 32, "prune_blocks": [3, 6, 9]}
    if tiny:
        vit_cfg.update(model_kwargs={"depth": 4, "embed_dim": 96, "num_heads": 2},
                       prune_blocks=[1, 2, 3])
    return RunConfig.from_dict({
        "tiling": {"mpp": 0.5, "tile_px": 224},
        "scorer": {"model": "mobilenetv3_small_100", "batch_size": 128},
        "vit": vit_cfg,
        "mil": {"hidden": 64},
    })


def dense(cfg: RunConfig) -> RunConfig:
    return cfg.dense()


def timed_run(inputs: list[Path], out: Path, cfg: RunConfig) -> tuple[list[dict], float]:
    t = time.perf_counter()
    rows = run_batch(inputs, out, cfg, progress=False, force=True)
    return rows, time.perf_counter() - t


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def stage_table(runs: dict[str, list[dict]]) -> str:
    """Markdown table of seconds per pipeline stage summed over each run's slides, with each
    stage's dense/pruned ratio (the first run is the reference)."""
    from wsi_prune.pipeline.process import STAGES

    ref = None
    lines = ["| run | " + " | ".join(STAGES) + " | total |", "|---" * (len(STAGES) + 2) + "|"]
    for name, rows in runs.items():
        sums = [sum(float(r.get(f"sec_{s}") or 0.0) for r in rows) for s in STAGES]
        sums.append(sum(sums))
        ref = ref or sums
        cells = [f"{v:.1f}" if ref is sums else f"{v:.1f} ({ref[i] / max(v, 1e-9):.1f}x)"
                 for i, v in enumerate(sums)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scale_part(out: Path, cfg: RunConfig, args: argparse.Namespace) -> None:
    """Wall time of dense vs pruned on a few larger slides (thousands of tissue tiles, as real
    CAMELYON16 slides have tens of thousands), same weights: where fixed per-slide costs
    (opening, thumbnail, pictures) no longer hide the ViT's share."""
    from wsi_prune.synth import write_dataset

    scale_dir = out / f"scale-slides-{args.scale_size}"
    if not (scale_dir / "labels.csv").is_file():
        write_dataset(scale_dir, n=args.scale_n, seed=3, size=args.scale_size)
    slides = sorted(p for p in scale_dir.iterdir() if p.suffix in (".svs", ".tif"))
    runs, walls = {}, {}
    for name, c in [("dense", dense(cfg))] + [
        (s, cfg.replace(**SETTINGS[s])) for s in args.settings.split(",")
    ]:
        rows, walls[name] = timed_run(slides, out / f"scale-{name}", c)
        runs[name] = rows
        print(f"scale {name}: {walls[name]:.0f} s")
    tiles = sum(int(r["tissue_tiles"] or 0) for r in runs["dense"])
    lines = [f"{len(slides)} synthetic slides of {args.scale_size}x{args.scale_size} px "
             f"({tiles} tissue tiles in all), same weights as above.", "",
             "| run | tokens to ViT | wall s | speed-up |", "|---|---|---|---|"]
    for name, rows in runs.items():
        ok = [x for x in rows if x["status"] in ("ok", "skipped")]
        tok = sum(x["token_fraction"] * x["tissue_tiles"] for x in ok) / max(
            1, sum(x["tissue_tiles"] for x in ok))
        lines.append(f"| {name} | {tok:.1%} | {walls[name]:.0f} | "
                     f"{walls['dense'] / walls[name]:.1f}x |")
    lines += ["", stage_table(runs)]
    text = "\n".join(lines)
    print(text)
    (out / "scale.md").write_text(text + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/e2e"))
    ap.add_argument("--n-train", type=int, default=24)
    ap.add_argument("--n-test", type=int, default=24)
    ap.add_argument("--size", type=int, default=4096, help="slide side, px at 0.5 µm/px")
    ap.add_argument("--vit", default="vit_small_patch16_224")
    ap.add_argument("--tiny", action="store_true", help="4-block ViT (fast)")
    ap.add_argument("--scorer-epochs", type=int, default=8)
    ap.add_argument("--settings", default="keep-A,keep-B,keep-C")
    ap.add_argument("--parts", default="accuracy,scale",
                    help="accuracy: the train/test table; scale: wall time on larger slides")
    ap.add_argument("--scale-n", type=int, default=3, help="slides of the scale part")
    ap.add_argument("--scale-size", type=int, default=16384, help="their side, px")
    ap.add_argument("--test-lesions", choices=["mixed", "small"], default="mixed",
                    help="mixed: the training set's lesion sizes; small: one 40-100 µm lesion "
                         "per tumour slide (ITC/micro-like, harder than the training set)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))

    from wsi_prune.evaluation.compare import compare_runs
    from wsi_prune.evaluation.runs import evaluate_run
    from wsi_prune.io.tiling import tile_slide
    from wsi_prune.synth import write_dataset
    from wsi_prune.training.mil import train_mil
    from wsi_prune.training.scorer import train_scorer

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    tag = "" if args.test_lesions == "mixed" else f"-{args.test_lesions}"
    train_dir, test_dir = out / "train-slides", out / f"test-slides{tag}"
    lesions = {"small": {"n_tumours": 1, "tumour_radius_um": (40.0, 100.0)}}
    t = time.perf_counter()
    for d, n, seed, over in ((train_dir, args.n_train, 1, {}),
                             (test_dir, args.n_test, 2, lesions.get(args.test_lesions, {}))):
        if not (d / "labels.csv").is_file():
            write_dataset(d, n=n, seed=seed, size=args.size, **over)
    timings["synthesise"] = time.perf_counter() - t
    train_slides = sorted(p for p in train_dir.iterdir() if p.suffix in (".svs", ".tif"))
    test_slides = sorted(p for p in test_dir.iterdir() if p.suffix in (".svs", ".tif"))

    cfg = base_config(args.tiny, args.vit)
    # 2. scorer from lesion annotations
    t = time.perf_counter()
    tiles = out / "train-tiles"
    stores = [tile_slide(s, tiles / f"{s.stem}.zarr", cfg).store_path for s in train_slides]
    scorer_w = out / "weights" / "scorer.safetensors"
    if not scorer_w.is_file():
        train_scorer(stores, train_dir, scorer_w, config=cfg.scorer, epochs=args.scorer_epochs,
                     progress=False)
    timings["train_scorer"] = time.perf_counter() - t
    cfg = cfg.replace(scorer={"weights": str(scorer_w)})

    # 3. dense embeddings of the training set -> MIL head
    t = time.perf_counter()
    run_batch(train_slides, out / "train-dense", dense(cfg), progress=False)
    mil_w = out / "weights" / "mil.safetensors"
    if not mil_w.is_file():
        res = train_mil(sorted((out / "train-dense").glob("*.zarr")), train_dir / "labels.csv",
                        mil_w, folds=min(4, args.n_train // 2), hidden=cfg.mil.hidden,
                        progress=False)
        print("MIL cross-validation:", getattr(res, "summary", lambda: res)())
    timings["train_mil"] = time.perf_counter() - t
    cfg = cfg.replace(mil={"weights": str(mil_w)})

    if "scale" in parts:
        scale_part(out, cfg, args)
    if "accuracy" not in parts:
        return

    # 4. test runs, same weights
    runs: dict[str, dict] = {}
    labels, ann = test_dir / "labels.csv", test_dir
    for name, c in [("dense", dense(cfg))] + [
        (s, cfg.replace(**SETTINGS[s])) for s in args.settings.split(",")
    ]:
        rows, wall = timed_run(test_slides, out / f"test{tag}-{name}", c)
        ev = evaluate_run(out / f"test{tag}-{name}", labels, ann)
        runs[name] = {"wall_s": wall, "rows": rows, "eval": ev}
        print(f"{name}: {wall:.0f} s, AUC {ev['slide_level']['auc']}")
    comps = {name: compare_runs(out / f"test{tag}-dense", out / f"test{tag}-{name}",
                                out / f"compare{tag}-{name}", labels, ann)
             for name in runs if name != "dense"}

    # 5. table
    dense_wall = runs["dense"]["wall_s"]
    lines = [
        f"Synthetic CAMELYON-like set: {args.n_train} training and {args.n_test} test slides "
        f"({args.test_lesions} lesions), "
        f"{args.size}x{args.size} px at 0.5 µm/px; ViT {args.vit}"
        f"{' (4 blocks)' if args.tiny else ''}; scorer mobilenetv3_small_100; same weights "
        f"in every run. Machine: {psutil.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.processor() or 'cpu'}; "
        f"{dt.date.today().isoformat()}.",
        "",
        "| run | tokens to ViT | GMACs (of dense) | wall s | speed-up | AUC [95% CI] | "
        "accuracy / sensitivity @0.5 | FROC | |ΔAUC| | ΔFROC | max |Δp| | label agreement | "
        "heat Spearman |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    budget: list[tuple[str, float, dict]] = []
    dense_auc = (runs["dense"]["eval"].get("slide_level") or {}).get("auc")
    dense_fr = (runs["dense"]["eval"].get("froc") or {}).get("average")
    for name, r in runs.items():
        ev = r["eval"]
        ok = [x for x in r["rows"] if x["status"] in ("ok", "skipped")]
        tok = sum(x["token_fraction"] * x["tissue_tiles"] for x in ok) / max(
            1, sum(x["tissue_tiles"] for x in ok))
        gm = sum(x["gmacs"] for x in ok)
        gd = sum(x["gmacs_dense"] for x in ok)
        # AUC is None when a run's test slides hold one class only (or every slide failed)
        auc = (ev.get("slide_level") or {}).get("auc")
        ci = (ev.get("slide_level") or {}).get("auc_ci") or [float("nan")] * 2
        fr = (ev.get("froc") or {}).get("average")
        if name == "dense":
            d_auc, d_fr, dp, agree, sp = "", "", "", "", ""
        else:
            c = comps[name]
            d_auc = "" if auc is None or dense_auc is None else f"{abs(auc - dense_auc):.3f}"
            d_fr = "" if fr is None or dense_fr is None else f"{fr - dense_fr:+.3f}"
            dp = f"{c['probability']['max_abs_diff']:.3f}"
            agree = f"{c['probability']['label_agreement']:.2f}"
            sp_v = c["heatmap"]["vit"]["mean"]
            sp = "" if sp_v is None else f"{sp_v:.2f}"
        sl = ev.get("slide_level") or {}
        budget.append((name, tok, {"auc": auc, "froc": fr, "sensitivity": sl.get("sensitivity")}))
        r["tokens"] = tok
        lines.append(
            f"| {name} | {tok:.1%} | {gm:.0f} ({gm / gd:.1%}) | {r['wall_s']:.0f} | "
            f"{dense_wall / r['wall_s']:.1f}x | {_num(auc)} [{ci[0]:.2f}, {ci[1]:.2f}] | "
            f"{_num(sl.get('accuracy'))} / {_num(sl.get('sensitivity'))} | "
            f"{'' if fr is None else f'{fr:.3f}'} | {d_auc} | {d_fr} | {dp} | {agree} | {sp} |")
    lines += ["", "Seconds per stage, summed over the test slides:", "",
              stage_table({n: r["rows"] for n, r in runs.items()})]
    lines += ["", "Preparation (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())]
    text = "\n".join(lines)
    print(text)
    (out / f"results{tag}.md").write_text(text + "\n")
    (out / f"results{tag}.json").write_text(json.dumps(
        {n: {"wall_s": r["wall_s"], "tokens": r["tokens"], "eval": r["eval"]}
         for n, r in runs.items()}, indent=2,
        default=str))

    budget_png(out / f"budget{tag}.png", budget, args.test_lesions)


def budget_png(path: Path, points: list[tuple[str, float, dict]], lesions: str) -> None:
    """Accuracy versus token budget: slide AUC, lesion FROC and slide sensitivity at the 0.5
    threshold against the share of tissue tokens that reached the ViT (log axis), one point
    per run (the dense run at 100 %)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(points, key=lambda p: p[1])
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for key, label, marker in (("auc", "slide AUC", "o"), ("froc", "lesion FROC", "s"),
                               ("sensitivity", "slide sensitivity @0.5", "^")):
        xy = [(tok * 100, m[key]) for _, tok, m in pts if m.get(key) is not None]
        if xy:
            ax.plot(*zip(*xy, strict=True), marker=marker, label=label)
    for name, tok, _ in pts:
        ax.annotate(name, (tok * 100, 0.02), fontsize=7, ha="center", rotation=90)
    ax.set_xscale("log")
    ax.set(xlabel="tissue tokens reaching the ViT (%, log)", ylabel="score", ylim=(0, 1.05),
           title=f"accuracy vs budget ({lesions} lesions)")
    ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
