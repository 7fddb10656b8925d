"""``wsi-prune train-scorer``, ``train-vit``, ``distill-vit`` and ``train-mil``: thin click
commands over :mod:`wsi_prune.training`. They are standalone :class:`click.Command` objects
that :mod:`wsi_prune.cli` registers with ``main.add_command``."""

from __future__ import annotations

import math

import click

from wsi_prune.cli.common import handle_errors

__all__ = ["distill_vit", "train_mil", "train_scorer", "train_vit"]


def _progress() -> bool:
    """Progress bars unless the ``wsi-prune`` group was given ``--quiet``."""
    ctx = click.get_current_context(silent=True)
    obj = ctx.find_root().obj if ctx is not None else None
    return not (isinstance(obj, dict) and obj.get("quiet"))


_stores = click.argument("stores", nargs=-1, required=True, type=click.Path(exists=True))
_out = click.option("--out", required=True, type=click.Path(dir_okay=False),
                    help="Weights file to write (.safetensors); its .json config goes next to it.")
_seed = click.option("--seed", type=int, default=0, show_default=True,
                     help="Same seed and threads, same weights.")
_threads = click.option("--threads", type=click.IntRange(min=1), default=None,
                        help="torch CPU threads while training (default: torch's).")


@click.command("train-scorer")
@_stores
@click.option("--annotations", type=click.Path(exists=True), default=None,
              help="Folder of ASAP XML lesion annotations named <slide id>.xml (level-0 px); "
                   "slides without one are lesion-free.")
@click.option("--distill", is_flag=True,
              help="Targets from a dense ViT run's vit/token_importance instead of annotations "
                   "(run stores of a dense config only: pruned runs are refused).")
@click.option("--tile-targets", type=click.Choice(["default", "vit"]), default="default",
              show_default=True,
              help="vit: the tile score learns the dense ViT's tile lesion probabilities (the "
                   "tile head train-vit saved beside the run's ViT), so triage keeps the tiles "
                   "the ViT rates highest; needs dense run stores (`run --dense`). default: the "
                   "pooled patch targets (annotations) or MIL attention (--distill).")
@_out
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              default=None, help="Pipeline YAML: its scorer section sets the architecture.")
@click.option("--model", default=None, help="timm CNN for the scorer (overrides --config).")
@click.option("--grid", type=click.IntRange(min=1), default=None,
              help="ViT patches per tile side (14 for 224 px / patch 16, 16 for patch 14). "
                   "[default: 14, or the dense run's]")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=2), default=64, show_default=True)
@click.option("--max-tiles-per-store", type=click.IntRange(min=0), default=512,
              show_default=True, help="Tiles drawn per slide, half with lesion (0: all).")
@click.option("--no-augment", is_flag=True, help="No random rotations/flips.")
@click.option("--pretrained-backbone", is_flag=True,
              help="Start from timm's ImageNet weights (downloads: needs network).")
@click.option("--init", "init_weights", type=click.Path(exists=True, dir_okay=False),
              default=None, help="Scorer weights to fine-tune from.")
@_seed
@_threads
@handle_errors
def train_scorer(stores: tuple[str, ...], annotations: str | None, distill: bool,
                 tile_targets: str, out: str, config_path: str | None, model: str | None,
                 grid: int | None, epochs: int, lr: float, batch_size: int,
                 max_tiles_per_store: int, no_augment: bool,
                 pretrained_backbone: bool, init_weights: str | None, seed: int,
                 threads: int | None) -> None:
    """Train the CNN triage scorer on slide stores (tile or run stores, or run folders).

    Patch targets are the fraction of each ViT patch inside an annotated lesion, or with
    --distill the dense ViT's token importance; with --tile-targets vit the tile score learns
    the dense ViT's tile lesion probabilities. Writes OUT (.safetensors) and OUT's .json, which
    `run` loads as scorer.weights.

    \b
    Examples:
      wsi-prune train-scorer tiles/ --annotations lesions/ --out models/scorer.safetensors
      wsi-prune train-scorer dense-run/ --distill --out models/scorer-distilled.safetensors
      wsi-prune train-scorer dense-run/ --annotations lesions/ --tile-targets vit \
          --out models/scorer-vit.safetensors
    """
    import dataclasses

    from wsi_prune.config import RunConfig
    from wsi_prune.training.scorer import train_scorer as run_training

    if annotations is not None and distill:
        raise click.UsageError("give --annotations or --distill, not both")
    if annotations is None and not distill:
        raise click.UsageError("give --annotations DIR, or --distill with dense run stores")
    scorer_cfg = (RunConfig.from_yaml(config_path) if config_path else RunConfig()).scorer
    if model is not None:
        scorer_cfg = dataclasses.replace(scorer_cfg, model=model)
    res = run_training(
        list(stores), annotations, out, distill=distill, tile_teacher=tile_targets == "vit",
        config=scorer_cfg, grid=grid,
        epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
        max_tiles_per_store=max_tiles_per_store or None, augment=not no_augment,
        pretrained_backbone=pretrained_backbone, init_weights=init_weights, threads=threads,
        progress=_progress(),
    )
    click.echo(f"{res.n_tiles} tiles ({res.n_positive} with target mass), grid {res.grid}: "
               f"loss {res.losses[0]:.4f} -> {res.losses[-1]:.4f} in {res.seconds:.1f} s")
    click.echo(f"wrote {res.weights} and {res.config}")


@click.command("train-mil")
@_stores
@click.option("--labels", "labels_csv", required=True,
              type=click.Path(exists=True, dir_okay=False),
              help="CSV slide,label (Tumor/Normal, 1/0 or CAMELYON17 pN stages).")
@_out
@click.option("--folds", type=click.IntRange(min=1), default=5, show_default=True,
              help="k of the stratified cross-validation (1: no validation).")
@click.option("--epochs", type=click.IntRange(min=1), default=100, show_default=True,
              help="Maximum epochs per fold.")
@click.option("--patience", type=click.IntRange(min=1), default=10, show_default=True,
              help="Stop a fold after this many epochs without a better validation loss.")
@click.option("--lr", type=float, default=2e-4, show_default=True)
@click.option("--hidden", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--dropout", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.25,
              show_default=True)
@click.option("--batch-bags", type=click.IntRange(min=1), default=8, show_default=True,
              help="Slides per training step.")
@click.option("--max-instances", type=click.IntRange(min=0), default=4096, show_default=True,
              help="Tiles drawn per slide per training step (0: all).")
@click.option("--model", "model", default="gated-abmil", show_default=True,
              help="Slide head (`wsi-prune models` lists them): gated-abmil, or tile-topk "
                   "(mean of the top-k tile lesion logits; fitted from the tile head train-vit "
                   "saved).")
@click.option("--tile-head", type=click.Path(exists=True, dir_okay=False), default=None,
              help="tile-topk: the tile head file (default: the one beside the stores' ViT "
                   "weights).")
@click.option("--top-k", "top_k", type=click.IntRange(min=1), multiple=True,
              help="tile-topk: k candidates, chosen by cross-validated log loss "
                   "(default 1 2 4 8 16; repeat the option).")
@click.option("--calibrate/--no-calibrate", default=True, show_default=True,
              help="Platt-scale a gradient-trained head on its out-of-fold logits (folds >= 2).")
@_seed
@_threads
@handle_errors
def train_mil(stores: tuple[str, ...], labels_csv: str, out: str, folds: int, epochs: int,
              patience: int, lr: float, hidden: int, dropout: float, batch_bags: int,
              max_instances: int, model: str, tile_head: str | None, top_k: tuple[int, ...],
              calibrate: bool, seed: int, threads: int | None) -> None:
    """Train a slide head on the ViT embeddings of run stores (or run folders).

    gated-abmil (default): k-fold cross-validation with early stopping on validation loss
    reports each fold's validation AUC; the final model is trained on every slide for the
    folds' median best epoch, and Platt-scaled on the folds' out-of-fold logits so that its
    probabilities are calibrated (--no-calibrate keeps the raw ones). tile-topk with a tile
    head: k and the calibration (scale, bias) are fitted on the slide labels, the tile head
    stays as train-vit trained it. Writes OUT (.safetensors) and OUT's .json, which `run` loads
    as mil.weights.

    \b
    Example:
      wsi-prune train-mil train-run/ --labels train/labels.csv --out models/mil.safetensors
      wsi-prune train-mil train-run/ --labels train/labels.csv --model tile-topk \\
          --out models/topk.safetensors
    """
    from wsi_prune.training.mil import train_mil as run_training

    res = run_training(
        list(stores), labels_csv, out, folds=folds, epochs=epochs, lr=lr, patience=patience,
        hidden=hidden, dropout=dropout, batch_bags=batch_bags,
        max_instances=max_instances or None, model=model, tile_head=tile_head,
        top_k=top_k or None, calibrate=calibrate, seed=seed, threads=threads, progress=_progress(),
    )
    n_pos = sum(res.slides.values())
    click.echo(f"{len(res.slides)} slides ({n_pos} positive)")
    for i, auc in enumerate(res.fold_auc, start=1):
        ep = f" (best epoch {res.best_epochs[i - 1]})" if res.best_epochs else ""
        click.echo(f"fold {i}: val AUC {auc:.3f}{ep}")
    if res.fold_auc:
        oof = "n/a" if math.isnan(res.oof_auc) else f"{res.oof_auc:.3f}"
        click.echo(f"mean val AUC {res.mean_auc:.3f}, out-of-fold AUC {oof}")
    if res.final_epochs:
        click.echo(f"final model: {res.final_epochs} epochs on all slides in {res.seconds:.1f} s")
    else:
        click.echo(f"final model: top_k {res.model.top_k}, fitted on all slides in "
                   f"{res.seconds:.1f} s")
    click.echo(f"wrote {res.weights} and {res.config}")


@click.command("train-vit")
@_stores
@click.option("--annotations", required=True, type=click.Path(exists=True),
              help="Folder of ASAP XML lesion outlines named <slide id>.xml (level-0 px); "
                   "slides without one are lesion-free.")
@_out
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              default=None, help="Pipeline YAML: its vit section (model, model_kwargs) and tiling "
                                 "set the architecture and tiles [default: a 6-block ViT-Ti/16, "
                                 "224 px at 0.5 µm/px].")
@click.option("--epochs", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--lr", type=float, default=5e-4, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=2), default=32, show_default=True)
@click.option("--max-tiles-per-store", type=click.IntRange(min=0), default=256,
              show_default=True, help="Tiles drawn per slide, half with lesion (0: all).")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.2,
              show_default=True, help="Share of slides held out for the validation metrics.")
@click.option("--max-minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop after this many minutes (the last finished epoch is kept).")
@click.option("--init", "init_weights", type=click.Path(exists=True, dir_okay=False),
              default=None, help="Backbone weights to fine-tune from.")
@click.option("--attention-loss-weight", type=click.FloatRange(min=0), default=1.0,
              show_default=True, help="Teach the CLS attention of the pruning blocks and the "
                                      "last block to look at lesion patches (0: off).")
@click.option("--no-augment", is_flag=True, help="No rotations, flips or colour jitter.")
@_seed
@_threads
@handle_errors
def train_vit(stores: tuple[str, ...], annotations: str, out: str, config_path: str | None,
              epochs: int, lr: float, batch_size: int, max_tiles_per_store: int,
              val_fraction: float, max_minutes: float | None, init_weights: str | None,
              attention_loss_weight: float, no_augment: bool, seed: int,
              threads: int | None) -> None:
    """Train a small ViT on lesion-labelled full-resolution tiles of slide stores, so that its
    CLS attention (and attention-based pruning) means something.

    A stand-in for real foundation models that trains on 2 CPU cores (the default 6-block
    ViT-Ti, about 20 img/s). Reads tiles from the slides the stores name. Writes OUT
    (.safetensors, the backbone) and OUT's .json (architecture, data, validation tile, patch
    and attention AUC); `run` loads it as vit.weights and takes the architecture from the json.

    \b
    Example:
      wsi-prune train-vit train-tiles/ --annotations lesions/ --out models/vit.safetensors
    """
    from wsi_prune.config import load_config
    from wsi_prune.training.vit import DEFAULT_VIT
    from wsi_prune.training.vit import train_vit as run_training

    cfg = load_config(config_path) if config_path else None
    res = run_training(
        list(stores), annotations, out, config=cfg.vit if cfg else DEFAULT_VIT,
        tiling=cfg.tiling if cfg else None, epochs=epochs, lr=lr, batch_size=batch_size,
        max_tiles_per_store=max_tiles_per_store or None, val_fraction=val_fraction,
        augment=not no_augment, max_minutes=max_minutes, init_weights=init_weights,
        attention_loss_weight=attention_loss_weight, seed=seed,
        threads=threads, progress=_progress())
    click.echo(f"{res.n_train} training tiles ({res.n_positive} lesion), {res.n_val} validation; "
               f"loss {res.losses[0]:.4f} -> {res.losses[-1]:.4f} in {res.seconds:.0f} s"
               + (" (time budget reached)" if res.stopped_early else ""))
    if res.val:
        click.echo("validation: " + ", ".join(
            f"{k} {v:.3f}" for k, v in res.val.items()
            if isinstance(v, float) and not k.startswith("n_")))
    click.echo(f"wrote {res.weights} and {res.config}")


@click.command("distill-vit")
@click.argument("dense_runs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--config", "config_path", required=True,
              type=click.Path(exists=True, dir_okay=False),
              help="The pipeline YAML the student will run with: vit.weights is the teacher "
                   "(a train-vit ViT with its tile head), scorer gives the CNN prior, vit and "
                   "token_select the pruning.")
@_out
@click.option("--keep-ratios", default="1,0.5,0.25,0.125", show_default=True,
              help="CNN-prior token ratios cycled over the batches (1: dense, keeps the "
                   "student's dense answer the teacher's).")
@click.option("--epochs", type=click.IntRange(min=1), default=6, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=2), default=32, show_default=True)
@click.option("--max-tiles-per-store", type=click.IntRange(min=0), default=256,
              show_default=True, help="Tiles drawn per slide, half of them those the scorer "
                                      "rates highest (0: all).")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.2,
              show_default=True, help="Share of slides held out for the validation table.")
@click.option("--max-minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop after this many minutes (the last finished epoch is kept).")
@_seed
@_threads
@handle_errors
def distill_vit(dense_runs: tuple[str, ...], config_path: str, out: str, keep_ratios: str,
                epochs: int, lr: float, batch_size: int, max_tiles_per_store: int,
                val_fraction: float, max_minutes: float | None, seed: int,
                threads: int | None) -> None:
    """Fine-tune a copy of the config's ViT so that, pruned as the config prunes, it gives the
    dense ViT's tile logits and embeddings (DynamicViT-style distillation; no labels).

    DENSE_RUNS are `run --dense` outputs of training slides made with the teacher
    (vit.weights); their slides must still be where the stores say. Writes OUT
    (.safetensors), its .json (the teacher's architecture, `distilled_from`, and per token
    ratio the held-out slides' logit error of the teacher pruned and of the student pruned)
    and the tile head beside it. Set vit.weights to OUT for the pruned runs; train the slide
    head on a pruned run with it (train as you infer).

    \b
    Example:
      wsi-prune run train-slides/ --dense --config cfg.yaml --out train-dense/
      wsi-prune distill-vit train-dense/ --config cfg.yaml --out models/vit-student.safetensors
    """
    from wsi_prune.config import load_config
    from wsi_prune.models.factory import apply_trained_configs
    from wsi_prune.training.distill import distill_vit as run_distill

    try:
        ratios = [float(r) for r in keep_ratios.split(",") if r.strip()]
    except ValueError:
        raise click.BadParameter(f"not a comma-separated list of numbers: {keep_ratios!r}",
                                 param_hint="--keep-ratios") from None
    cfg = apply_trained_configs(load_config(config_path))
    res = run_distill(list(dense_runs), out, cfg, keep_ratios=ratios, epochs=epochs, lr=lr,
                      batch_size=batch_size, max_tiles_per_store=max_tiles_per_store or None,
                      val_fraction=val_fraction, max_minutes=max_minutes, seed=seed,
                      threads=threads, progress=_progress())
    click.echo(f"{res.n_train} training tiles, {res.n_val} held out; loss {res.losses[0]:.4f} -> "
               f"{res.losses[-1]:.4f} in {res.seconds:.0f} s"
               + (" (time budget reached)" if res.stopped_early else ""))
    for ratio, row in res.val.items():
        click.echo(f"{ratio}: tile-logit RMSE against the dense teacher {row['teacher_rmse']:.3f} "
                   f"(teacher pruned) -> {row['student_rmse']:.3f} (student pruned), "
                   f"{row['student_tokens']:.0f} tokens")
    click.echo(f"wrote {res.weights} and {res.config}")
