"""Throughput and analytic GMACs of the token-pruned ViT against the dense one, on CPU.

One run measures, for ``vit_small_patch16_224`` (real size, random weights: ``pretrained=False``,
no network) over a batch of random 224 px tiles:

* the dense timm model (``forward_features`` + ``forward_head(pre_logits=True)``) and the
  wrapper with keep-all settings (its overhead);
* the CNN-prior token selection alone (keep ratio 0.5, 0.25), in-network pruning alone (ratio
  0.7 at blocks 3/6/9) and both together;
* padding + key mask against length bucketing, on nucleus settings where every image keeps a
  different number of tokens.

Each setting is timed ``--reps`` times after one warm-up, interleaved across settings so that
load from other processes on a shared machine spreads over all of them. Images/s are reported
for the best repetition (the least disturbed, the usual estimate of what the code can do) and
the median; speed-ups use the best.
GMACs come from :func:`wsi_prune.flops.vit_batch_macs` on the token counts the run produced.
The cosine similarity of pruned vs dense embeddings is reported too, with random weights: it
says nothing about a trained model's fidelity.

    python benchmarks/bench_pruning.py --batch 32 --reps 3 --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F

from wsi_prune.config import TokenSelectConfig, ViTConfig
from wsi_prune.flops import ViTSpec, vit_batch_macs, vit_macs
from wsi_prune.models.pruned_vit import PrunedOutput, PrunedViT
from wsi_prune.prune import select_patches


@dataclass
class Setting:
    """One row of the table."""

    name: str
    prior: TokenSelectConfig | None  # None: every patch enters
    vit: ViTConfig
    batching: str = "pad"


def importance_maps(b: int, grid: int, seed: int) -> torch.Tensor:
    """(B, grid, grid) smooth random maps whose peakiness differs per tile, like CNN maps."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 1, 4, 4, generator=g)
    smooth = F.interpolate(coarse, size=(grid, grid), mode="bilinear", align_corners=False)[:, 0]
    sharp = torch.linspace(1.0, 8.0, b)[:, None, None]
    return smooth**sharp


def settings() -> list[Setting]:
    no_prune = ViTConfig(prune_blocks=())
    in_vit = ViTConfig(prune_blocks=(3, 6, 9), prune_policy="ratio", keep_ratio=0.7)
    nucleus = ViTConfig(prune_blocks=(3, 6, 9), prune_policy="nucleus", prune_p=0.9)
    ratio = lambda r: TokenSelectConfig(policy="ratio", keep_ratio=r)  # noqa: E731
    nuc_prior = TokenSelectConfig(policy="nucleus", p=0.7)
    return [
        Setting("wrapper, keep all", None, no_prune),
        Setting("prior ratio 0.5", ratio(0.5), no_prune),
        Setting("prior ratio 0.25", ratio(0.25), no_prune),
        Setting("in-ViT ratio 0.7 @3/6/9", None, in_vit),
        Setting("prior 0.5 + in-ViT 0.7", ratio(0.5), in_vit),
        Setting("prior 0.25 + in-ViT 0.7", ratio(0.25), in_vit),
        Setting("nucleus prior p0.7 + in-ViT p0.9, pad", nuc_prior, nucleus, "pad"),
        Setting("nucleus prior p0.7 + in-ViT p0.9, bucket", nuc_prior, nucleus, "bucket"),
        Setting("nucleus prior p0.7, pad", nuc_prior, no_prune, "pad"),
        Setting("nucleus prior p0.7, bucket", nuc_prior, no_prune, "bucket"),
    ]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = timm.create_model(args.model, pretrained=False, num_classes=0).eval()
    spec = ViTSpec.from_timm(model)
    grid = int(model.patch_embed.grid_size[0])
    b = args.batch
    x = torch.randn(b, 3, spec.img_size, spec.img_size, generator=torch.Generator().manual_seed(1))
    imp = importance_maps(b, grid, seed=2)

    runs: dict[str, Callable[[], object]] = {}
    with torch.inference_mode():
        dense_emb = model.forward_head(model.forward_features(x), pre_logits=True)
    runs["dense timm"] = lambda: model.forward_head(model.forward_features(x), pre_logits=True)
    outputs: dict[str, PrunedOutput] = {}
    for s in settings():
        keep = None if s.prior is None else select_patches(imp, s.prior, grid=(grid, grid))
        wrapper = PrunedViT(model, s.vit, batching=s.batching)
        runs[s.name] = lambda w=wrapper, k=keep: w(x, k)
        with torch.inference_mode():
            outputs[s.name] = wrapper(x, keep)

    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(args.reps):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)

    dense_macs = vit_macs(spec)

    def best(name: str) -> float:
        return b / min(times[name])

    def median(name: str) -> float:
        return b / statistics.median(times[name])

    dense_ips = best("dense timm")
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(
        f"# {args.model}, batch {b}, {args.threads} threads, torch {torch.__version__}, "
        f"timm {timm.__version__}, {platform.processor() or platform.machine()}, "
        f"load avg {load[0]:.1f} at the end; {args.reps} repetitions"
    )
    print(
        "| setting | patch tokens | img/s best | img/s median | speed-up | GMACs/img "
        "| MACs vs dense | cos vs dense |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| dense timm | 100 % | {dense_ips:.1f} | {median('dense timm'):.1f} | 1.00x | "
        f"{dense_macs / 1e9:.2f} | 1.00 | 1 |"
    )
    for s in settings():
        out = outputs[s.name]
        ips = best(s.name)
        tally = vit_batch_macs(spec, out.tokens_per_image, cls_attn_blocks=out.cls_attn_blocks)
        # Token share across the whole network: patch tokens x blocks, as the ViT saw them.
        t = out.tokens_per_image.double()
        share = float((t - spec.num_prefix_tokens).clamp_min(0).mean() / spec.n_patches)
        print(
            f"| {s.name} | {100 * share:.0f} % | {ips:.1f} | {median(s.name):.1f} | "
            f"{ips / dense_ips:.2f}x | "
            f"{tally.vit / b / 1e9:.2f} | {tally.vit / tally.dense:.2f} | "
            f"{cosine(out.embedding, dense_emb):.3f} |"
        )
    counts = outputs["nucleus prior p0.7, pad"].tokens_per_image[:, 0, 0]
    print(
        f"\npadding vs bucketing ({len(set(counts.tolist()))} distinct token counts in {b} "
        f"images, {int(counts.min())}..{int(counts.max())} tokens entering block 0):"
    )
    for tail in ("nucleus prior p0.7 + in-ViT p0.9", "nucleus prior p0.7"):
        pad, bucket = f"{tail}, pad", f"{tail}, bucket"
        print(
            f"  {tail}: pad/bucket {best(pad) / best(bucket):.2f}x best, "
            f"{median(pad) / median(bucket):.2f}x median"
        )


if __name__ == "__main__":
    main()
