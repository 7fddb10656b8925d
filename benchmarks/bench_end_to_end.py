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
from wsi_prune.pipeline import run_batch

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
    args = ap.parse_args()

    from wsi_prune.evaluate import compare_runs, evaluate_run
    from wsi_prune.synth import write_dataset
    from wsi_prune.tiling import tile_slide
    from wsi_prune.train import train_mil, train_scorer

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    train_dir, test_dir = out / "train-slides", out / "test-slides"
    t = time.perf_counter()
    for d, n, seed in ((train_dir, args.n_train, 1), (test_dir, args.n_test, 2)):
        if not (d / "labels.csv").is_file():
            write_dataset(d, n=n, seed=seed, size=args.size)
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

    # 4. test runs, same weights
    runs: dict[str, dict] = {}
    labels, ann = test_dir / "labels.csv", test_dir
    for name, c in [("dense", dense(cfg))] + [
        (s, cfg.replace(**SETTINGS[s])) for s in args.settings.split(",")
    ]:
        rows, wall = timed_run(test_slides, out / f"test-{name}", c)
        ev = evaluate_run(out / f"test-{name}", labels, ann)
        runs[name] = {"wall_s": wall, "rows": rows, "eval": ev}
        print(f"{name}: {wall:.0f} s, AUC {ev['slide_level']['auc']}")
    comps = {name: compare_runs(out / "test-dense", out / f"test-{name}",
                                out / f"compare-{name}", labels, ann)
             for name in runs if name != "dense"}

    # 5. table
    dense_wall = runs["dense"]["wall_s"]
    lines = [
        f"Synthetic CAMELYON-like set: {args.n_train} training and {args.n_test} test slides, "
        f"{args.size}x{args.size} px at 0.5 µm/px; ViT {args.vit}"
        f"{' (4 blocks)' if args.tiny else ''}; scorer mobilenetv3_small_100; same weights "
        f"in every run. Machine: {psutil.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.processor() or 'cpu'}; "
        f"{dt.date.today().isoformat()}.",
        "",
        "| run | tokens to ViT | GMACs (of dense) | wall s | speed-up | AUC [95% CI] | "
        "FROC | |ΔAUC| | ΔFROC | max |Δp| | label agreement | heat Spearman |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    budget = []
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
            budget.append((tok, auc, fr))
        lines.append(
            f"| {name} | {tok:.1%} | {gm:.0f} ({gm / gd:.1%}) | {r['wall_s']:.0f} | "
            f"{dense_wall / r['wall_s']:.1f}x | {_num(auc)} [{ci[0]:.2f}, {ci[1]:.2f}] | "
            f"{'' if fr is None else f'{fr:.3f}'} | {d_auc} | {d_fr} | {dp} | {agree} | {sp} |")
    lines += ["", "Preparation (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())]
    text = "\n".join(lines)
    print(text)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(
        {n: {"wall_s": r["wall_s"], "eval": r["eval"]} for n, r in runs.items()}, indent=2,
        default=str))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    budget.sort(key=lambda b: b[0])  # an AUC may be None: never compared
    if all(b[1] is not None for b in budget):
        ax.plot([b[0] * 100 for b in budget], [b[1] for b in budget], "o-", label="pruned AUC")
    if dense_auc is not None:
        ax.axhline(dense_auc, color="k", ls="--", label="dense AUC")
    if all(b[2] is not None for b in budget):
        ax.plot([b[0] * 100 for b in budget], [b[2] for b in budget], "s-", label="pruned FROC")
    ax.set_xlabel("tissue tokens reaching the ViT (%)")
    ax.set_ylabel("score")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "budget.png")


if __name__ == "__main__":
    main()
