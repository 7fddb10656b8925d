"""The patch embedding of kept patches only against timm's convolution over every patch
(``wsi_prune.models.kept_embed``; results in docs/benchmarks.md, token pruning section).

For each CNN-prior ratio, a batch of tiles is embedded both ways (the embedding alone) and run
through the whole :class:`~wsi_prune.models.pruned_vit.PrunedViT` both ways (the kept path
switched off by setting ``kept_embed.MAX_KEPT_SHARE`` to 0). Rounds alternate the two ways;
the table gives the median and best of the rounds, and the ratio of medians.

    python benchmarks/bench_kept_embed.py
    python benchmarks/bench_kept_embed.py --model vit_small_patch16_224 --depth 12

Random weights and random keep masks (``ceil(ratio * P)`` patches per tile, as the ratio
prior keeps); timings do not depend on either. Not a test.

A last table times the ViT's input from the same number of uint8 tiles:
:meth:`~wsi_prune.models.factory.Models.vit_input` against the formula it computes written out
(``(x / 255 - mean) / std`` on the permuted tiles: four passes, two new tensors).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import timm
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wsi_prune.config import RunConfig, ViTConfig  # noqa: E402
from wsi_prune.models import kept_embed  # noqa: E402
from wsi_prune.models.factory import build_models  # noqa: E402
from wsi_prune.models.pruned_vit import PrunedViT  # noqa: E402


def _keep(b: int, p: int, ratio: float, g: torch.Generator) -> torch.Tensor:
    n = math.ceil(ratio * p - 1e-9)
    keep = torch.zeros(b, p, dtype=torch.bool)
    for i in range(b):
        keep[i, torch.randperm(p, generator=g)[:n]] = True
    return keep


def _rounds(fns: dict[str, object], rounds: int) -> dict[str, list[float]]:
    """Seconds of each call, ``rounds`` times in turn, after one untimed warm-up round."""
    for fn in fns.values():
        fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--depth", type=int, default=6, help="blocks (the fidelity ViT-Ti: 6)")
    ap.add_argument("--prune-blocks", type=int, nargs="*", default=[2, 4])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.375, 0.25, 0.125, 0.0612])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, depth=args.depth,
                              num_classes=0).eval()
    vit = PrunedViT(model, ViTConfig(prune_blocks=tuple(args.prune_blocks), keep_ratio=0.7))
    pe = model.patch_embed
    size = int(pe.img_size[0])
    p = int(pe.num_patches)
    x = torch.randn(args.batch, 3, size, size)
    g = torch.Generator().manual_seed(1)
    limit = kept_embed.MAX_KEPT_SHARE
    print(f"{args.model} depth {args.depth}, {args.batch} tiles of {size} px, {args.threads} "
          f"threads, {args.rounds} rounds; torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}; kept path used up to a share of "
          f"{limit}\n")
    print("| ratio | patches / tile | embedding: kept / conv ms (median, best) | ratio | "
          "PrunedViT: kept / conv ms (median, best) | ratio |")
    print("|---:|---:|---|---:|---|---:|")

    def forced(on: bool, keep: torch.Tensor) -> None:
        with _kept_share(1.0 if on else 0.0):
            vit(x, keep)

    with torch.inference_mode():
        for r in args.ratios:
            keep = _keep(args.batch, p, r, g)
            emb = _rounds({"kept": lambda k=keep: _embed_forced(pe, x, k),
                           "conv": lambda: pe(x)}, args.rounds)
            fwd = _rounds({"kept": lambda k=keep: forced(True, k),
                           "conv": lambda k=keep: forced(False, k)}, args.rounds)
            cells = []
            for t in (emb, fwd):
                mk, mc = statistics.median(t["kept"]), statistics.median(t["conv"])
                cells += [f"{1e3 * mk:.1f} ({1e3 * min(t['kept']):.1f}) / {1e3 * mc:.1f} "
                          f"({1e3 * min(t['conv']):.1f})", f"{mc / mk:.2f}x"]
            n = int(keep[0].sum())
            print(f"| {r:g} | {n} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} |")
    _input_table(args, size)


def _input_table(args: argparse.Namespace, size: int) -> None:
    """``Models.vit_input`` against the formula written out, on ``args.batch`` uint8 tiles."""
    models = build_models(RunConfig().replace(
        vit={"model": args.model, "model_kwargs": {"depth": args.depth},
             "prune_blocks": tuple(args.prune_blocks)}))
    tiles = torch.randint(0, 256, (args.batch, size, size, 3), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(2)).numpy()
    mean, std = models.vit_mean, models.vit_std

    def formula() -> torch.Tensor:
        return (torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0 - mean) / std

    t = _rounds({"vit_input": lambda: models.vit_input(tiles), "formula": formula},
                args.rounds)
    diff = float((models.vit_input(tiles) - formula()).abs().max())
    mv, mf = statistics.median(t["vit_input"]), statistics.median(t["formula"])
    print(f"\n| ViT input, {args.batch} tiles | vit_input ms (median, best) | formula ms | ratio "
          f"| max abs difference |\n|---|---|---|---:|---:|\n"
          f"| uint8 (B, {size}, {size}, 3) | {1e3 * mv:.1f} ({1e3 * min(t['vit_input']):.1f}) "
          f"| {1e3 * mf:.1f} ({1e3 * min(t['formula']):.1f}) | {mf / mv:.2f}x | {diff:.1e} |")


@contextlib.contextmanager
def _kept_share(share: float) -> Iterator[None]:
    """``kept_embed.MAX_KEPT_SHARE`` set to ``share`` inside the block (0: always the
    convolution; 1: always the kept path)."""
    limit = kept_embed.MAX_KEPT_SHARE
    kept_embed.MAX_KEPT_SHARE = share
    try:
        yield
    finally:
        kept_embed.MAX_KEPT_SHARE = limit


def _embed_forced(pe: torch.nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The kept path whatever the share (the benchmark times it above the limit too)."""
    with _kept_share(1.0):
        out = kept_embed.embed_kept_patches(pe, x, keep)
    assert out is not None
    return out


if __name__ == "__main__":
    main()
