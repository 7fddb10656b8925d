"""``make demo``: the main job on a built-in default.

Writes a few synthetic CAMELYON-like slides (half with planted tumour regions), adds the real
Aperio slide from ``../shared/data`` when it is there, and runs
:func:`wsi_prune.pipeline.batch.run_batch` with the tiny demo models (the same settings as
``pipelines/demo.yaml``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from wsi_prune.config import RunConfig

_logger = logging.getLogger(__name__)

#: Same as pipelines/demo.yaml (a test keeps them equal); here so an installed package has it.
DEMO_CONFIG: dict[str, Any] = {
    "tiling": {"mpp": 0.5, "tile_px": 224, "coarse_factor": 4, "tissue_threshold": 0.25,
               "tiles_per_shard": 64},
    "scorer": {"model": "mobilenetv3_small_100", "batch_size": 64},
    "tile_select": {"policy": "nucleus", "p": 0.5, "min_tiles": 4, "max_tiles": 256},
    "token_select": {"policy": "ratio", "keep_ratio": 0.5},
    "vit": {"model": "vit_small_patch16_224",
            "model_kwargs": {"depth": 4, "embed_dim": 96, "num_heads": 2},
            "prune_blocks": [1, 2, 3], "prune_policy": "ratio", "keep_ratio": 0.7,
            "batch_size": 32},
    "mil": {"hidden": 64},
}

_REAL_SLIDE = Path(__file__).resolve().parents[3] / "shared" / "data" / "cmu-1-small-region.svs"


def demo_config() -> RunConfig:
    return RunConfig.from_dict(DEMO_CONFIG)


def find_real_slide() -> Path | None:
    """The real slide shipped next to the repository (``../shared/data``), if present."""
    for cand in (_REAL_SLIDE, Path.cwd().parent / "shared" / "data" / _REAL_SLIDE.name):
        if cand.is_file():
            return cand
    return None


def model_note(config: RunConfig) -> str:
    """Which models of a run are trained and which are random-init, in plain words.

    The demo trains the scorer and the MIL head but never the ViT: its embeddings are the
    random-init features (seeded, the same in every run) that the MIL head learns on.
    """

    def state(weights: str | None, pretrained: bool = False) -> str:
        if weights:
            return f"trained ({weights})"
        return "pretrained (timm weights)" if pretrained else "UNTRAINED (random init)"

    kwargs = "".join(f", {k}={v}" for k, v in sorted(config.vit.model_kwargs.items()))
    lines = [
        "NOTE: models of this run:",
        f"  CNN scorer ({config.scorer.model}): {state(config.scorer.weights)}",
        f"  ViT ({config.vit.model}{kwargs}): {state(config.vit.weights, config.vit.pretrained)}",
        f"  MIL slide head: {state(config.mil.weights)}",
    ]
    if not (config.scorer.weights and config.vit.weights and config.mil.weights):
        lines.append("  Random-init models make the numbers and heatmaps show the pipeline "
                     "working, not a diagnosis.")
    return "\n".join(lines)


def train_demo_models(out: Path, train_dir: Path, config: RunConfig, quiet: bool = False,
                      scorer_epochs: int = 4) -> RunConfig:
    """Train the scorer (from the lesion XML), then the MIL head on the bags the pipeline will
    feed it: a pruned run of the training slides with that scorer (train as you infer; a head
    trained on dense bags sees only the most suspicious tiles of a pruned bag and calls normal
    slides tumour). Return ``config`` pointing at the weights. Reuses weights already there."""
    import click

    from wsi_prune.io.tiling import tile_slide
    from wsi_prune.pipeline.batch import run_batch
    from wsi_prune.pipeline.inputs import discover
    from wsi_prune.training.mil import train_mil
    from wsi_prune.training.scorer import train_scorer

    weights = out / "weights"
    scorer_w, mil_w = weights / "scorer.safetensors", weights / "mil.safetensors"
    slides = [e.path for e in discover([train_dir])]
    train_run = out / "train-run"
    if not scorer_w.is_file():
        click.echo(f"training the CNN scorer on {len(slides)} slides' lesion annotations ...")
        stores = [tile_slide(s, train_run / f"{s.stem}.zarr", config).store_path for s in slides]
        train_scorer(stores, train_dir, scorer_w, config=config.scorer, epochs=scorer_epochs,
                     progress=not quiet)
    config = config.replace(scorer={"weights": str(scorer_w)})
    if not mil_w.is_file():
        click.echo("pruned run on the training slides (train as you infer), then training the "
                   "MIL head on its bags ...")
        run_batch(slides, train_run, config, progress=not quiet)
        # Six slides: 3 folds keep a tumour and a normal slide in every validation split (with
        # 2 folds early stopping saw 3-slide splits and stopped at once, leaving p ~ 0.5 for
        # every test slide; train_mil lowers k when a class has fewer slides), and lr 1e-3
        # (not train-mil's 2e-4, tuned for hundreds of slides) learns in the epochs such a
        # small set allows.
        res = train_mil(sorted(train_run.glob("*.zarr")), train_dir / "labels.csv", mil_w,
                        folds=3, lr=1e-3, patience=20, hidden=config.mil.hidden,
                        progress=not quiet)
        click.echo(f"MIL cross-validation AUC per fold: {res.fold_auc} ({res.regime} bags)")
    return config.replace(mil={"weights": str(mil_w)})


def run_demo(out: Path, n_train: int = 6, n_test: int = 4, size: int = 4096, real: bool = True,
             quiet: bool = False, train: bool = True, config: RunConfig | None = None,
             ) -> list[dict[str, Any]]:
    """Generate the demo slides (once), train the demo models on a training set (once), run
    the pipeline on a separate test set and evaluate it; the real slide runs too when present.

    Returns:
        The ``predictions.csv`` rows of the test set (and of the real slide).
    """
    import click

    from wsi_prune.evaluation.runs import evaluate_run
    from wsi_prune.pipeline.batch import run_batch
    from wsi_prune.synth import write_dataset

    out = Path(out)
    train_dir, test_dir = out / "train-slides", out / "slides"
    for d, n, seed in ((train_dir, n_train, 1), (test_dir, n_test, 0)):
        if train or d is test_dir:
            if not (d / "labels.csv").is_file():
                click.echo(f"writing {n} synthetic slides ({size}x{size} px) to {d} ...")
                write_dataset(d, n=n, seed=seed, size=size)
    cfg = config or demo_config()
    if train:
        cfg = train_demo_models(out, train_dir, cfg, quiet)
    click.echo(model_note(cfg))
    rows = run_batch([test_dir], out / "run", cfg, progress=not quiet)
    metrics = evaluate_run(out / "run", test_dir / "labels.csv", test_dir, n_boot=200)
    sl, fr = metrics.get("slide_level") or {}, metrics.get("froc") or {}
    click.echo(f"test set: AUC {_num(sl.get('auc'))}, accuracy {_num(sl.get('accuracy'))}, "
               f"FROC {_num(fr.get('average'))} (report: {out / 'run' / 'evaluation'}/report.md)")
    real_slide = find_real_slide() if real else None
    if real_slide is not None:
        click.echo(f"also running the real slide {real_slide} (CMU-1, an Aperio H&E sample, "
                   "not a lymph node: the demo models know only synthetic slides, so its "
                   "probability says nothing about it; look at its tissue mask and tiles)")
        rows += run_batch([real_slide], out / "real", cfg, progress=not quiet)
    click.echo(f"pictures: {out / 'run'}/<id>/heatmap.png and tokens.png; "
               f"table: {out / 'run' / 'predictions.csv'}")
    return rows


def _num(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"
