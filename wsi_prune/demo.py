"""``make demo``: the main job on a built-in default.

Writes a few synthetic CAMELYON-like slides (half with planted tumour regions), adds the real
Aperio slide from ``../shared/data`` when it is there, and runs :func:`wsi_prune.pipeline.run_batch`
with the tiny demo models (the same settings as ``pipelines/demo.yaml``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .config import RunConfig

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

_REAL_SLIDE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cmu-1-small-region.svs"


def demo_config() -> RunConfig:
    return RunConfig.from_dict(DEMO_CONFIG)


def find_real_slide() -> Path | None:
    """The real slide shipped next to the repository (``../shared/data``), if present."""
    for cand in (_REAL_SLIDE, Path.cwd().parent / "shared" / "data" / _REAL_SLIDE.name):
        if cand.is_file():
            return cand
    return None


def run_demo(out: Path, n: int = 4, size: int = 6144, real: bool = True, quiet: bool = False,
             config: RunConfig | None = None) -> list[dict[str, Any]]:
    """Generate the demo slides (once) and run the pipeline on them.

    Returns:
        The ``predictions.csv`` rows.
    """
    import click

    from .pipeline import run_batch
    from .synth import write_dataset

    out = Path(out)
    slides_dir = out / "slides"
    if not (slides_dir / "labels.csv").is_file():
        click.echo(f"writing {n} synthetic slides ({size}x{size} px) to {slides_dir} ...")
        write_dataset(slides_dir, n=n, seed=0, size=size)
    inputs: list[Path] = [slides_dir]
    real_slide = find_real_slide() if real else None
    if real_slide is not None:
        inputs.append(real_slide)
        click.echo(f"using the real slide {real_slide}")
    cfg = config or demo_config()
    trained = bool(cfg.scorer.weights and cfg.mil.weights)
    if not trained:
        click.echo("NOTE: the demo models are UNTRAINED (random weights): probabilities and "
                   "heatmaps show the pipeline working, not a diagnosis.")
    rows = run_batch(inputs, out / "run", cfg, progress=not quiet)
    click.echo(f"pictures: {out / 'run'}/<id>/heatmap.png and tokens.png; "
               f"table: {out / 'run' / 'predictions.csv'}")
    return rows
