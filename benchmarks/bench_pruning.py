"""Throughput and analytic GMACs of the token-pruned ViT against the dense one, on CPU.

One run measures, for ``vit_small_patch16_224`` (real size, random weights: ``pretrained=False``,
no network) over one batch of 224 px tissue tiles at 0.5 µm/px, half cut from the real slide in
``../shared/data/`` and half from a synthetic slide (:func:`wsi_prune.synth.write_slide`), both
through the package's own tissue mask and tile grid:

* the dense timm model (``forward_features`` + ``forward_head(pre_logits=True)``) and the
  wrapper with keep-all settings (its overhead);
* the CNN-prior token selection alone (keep ratio 0.5, 0.25; nucleus p 0.5/0.7/0.9), in-network
  pruning alone (ratio 0.7 at blocks 3/6/9; nucleus p 0.5/0.7/0.9) and both together;
* padding + key mask against length bucketing, on nucleus settings where every image keeps a
  different number of tokens;
* ToMe token merging (bipartite soft matching with proportional attention, Bolya et al. 2023),
  the training-free peer, with its merge count ``r`` chosen for about the GMACs of in-ViT ratio
  0.7 and of prior 0.25 + in-ViT 0.7.

The token prior is the real CNN scorer (:mod:`wsi_prune.models.scorer`, default
``mobilenetv3_small_100``) run on the matching 56 px coarse tiles at 2.0 µm/px (same footprint),
with **random-init weights**: its maps have the shape and cost of the real ones, not their
meaning. Its images/s and GMACs per tile have their own row; the ViT rows time the ViT only (in
the pipeline the scorer runs once per tile anyway, for tile selection), and ``+scorer`` adds its
GMACs to the rows that use its map.

Each setting is timed ``--reps`` times after one warm-up, interleaved across settings so that
load from other processes on a shared machine spreads over all of them. Images/s are reported
for the best repetition (the least disturbed, the usual estimate of what the code can do) and
the median; speed-ups use the best. GMACs come from
:func:`wsi_prune.selection.macs.vit_batch_macs` on the token counts the run produced (ToMe:
:func:`wsi_prune.selection.schedules.tome_schedule`, its matching cost left out as in its
paper). The cosine similarity of pruned vs dense embeddings is reported too, with random
weights: it says nothing about a trained model's fidelity.

    python benchmarks/bench_pruning.py --batch 32 --reps 3 --threads 2
    python benchmarks/bench_pruning.py --batch 4 --reps 1 --model vit_tiny_patch16_224 \\
        --synth-px 1024   # smoke run, seconds
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import timm.data
import torch
import torch.nn.functional as F
from torch import nn

from wsi_prune.config import ScorerConfig, TilingConfig, TissueConfig, TokenSelectConfig, ViTConfig
from wsi_prune.io.slide import Slide
from wsi_prune.io.tiling import make_grid, read_tiles
from wsi_prune.io.tissue import tissue_mask
from wsi_prune.models.pruned_vit import PrunedOutput, PrunedViT
from wsi_prune.models.scorer import build_scorer, score_tiles, to_input
from wsi_prune.selection.macs import ViTSpec, cnn_macs, vit_batch_macs, vit_macs
from wsi_prune.selection.schedules import tome_schedule
from wsi_prune.selection.tokens import select_patches
from wsi_prune.synth import SynthSpec, write_slide

REAL_SLIDE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cmu-1-small-region.svs"


@dataclass
class Setting:
    """One row of the table."""

    name: str
    prior: TokenSelectConfig | None  # None: every patch enters
    vit: ViTConfig
    batching: str = "pad"


# -- tiles ------------------------------------------------------------------------------------
def slide_tiles(path: Path, n: int, tiling: TilingConfig) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` tissue tiles of a slide, spread evenly over its tissue grid.

    Returns:
        full (k, tile_px, tile_px, 3) uint8 at ``tiling.mpp`` and coarse (k, coarse_px,
        coarse_px, 3) uint8 at ``tiling.coarse_mpp``, the same footprints, k <= n.
    """
    tissue = TissueConfig()
    with Slide(path) as slide:
        info = slide.info
        thumb = slide.read_thumbnail(tissue.mask_mpp)
        mask_mpp = info.width * info.mpp / thumb.shape[1]
        grid = make_grid(info, tissue_mask(thumb, mask_mpp, tissue).mask, mask_mpp, tiling)
        k = min(n, len(grid))
        pick = np.unique(np.linspace(0, len(grid) - 1, k).round().astype(int)) if k else []
        xy = grid.level0_xy[pick]
        full, _ = read_tiles(slide, xy, grid.tile_level0, tiling.mpp, tiling.tile_px)
        coarse, _ = read_tiles(slide, xy, grid.tile_level0, tiling.coarse_mpp, tiling.coarse_px)
    return full, coarse


def batch_of_tiles(
    b: int, tile_px: int, real: Path, synth_px: int, seed: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """``b`` full and coarse tiles, half from ``real``, the rest from a synthetic slide."""
    tiling = TilingConfig(mpp=0.5, tile_px=tile_px, coarse_factor=4)
    full_r, coarse_r = slide_tiles(real, b - b // 2, tiling)
    with tempfile.TemporaryDirectory() as tmp:
        synth = Path(tmp) / "synth.svs"
        write_slide(synth, SynthSpec(width=synth_px, height=synth_px, seed=seed))
        full_s, coarse_s = slide_tiles(synth, b - len(full_r), tiling)
    full, coarse = np.concatenate([full_r, full_s]), np.concatenate([coarse_r, coarse_s])
    if len(full) == 0:
        raise SystemExit("no tissue tile found in either slide")
    note = (f"{len(full_r)} tiles from {real.name}, {len(full_s)} from a {synth_px}² px "
            "synthetic svs")
    if len(full) < b:  # small slides: repeat tiles rather than shrink the batch
        note += f", repeated to {b}"
        idx = np.resize(np.arange(len(full)), b)
        full, coarse = full[idx], coarse[idx]
    return full, coarse, note


# -- ToMe: bipartite soft matching, for the training-free peer ---------------------------------
def tome_merge(
    x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int, n_prefix: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``r`` patch tokens into their most similar partners (ToMe's bipartite matching).

    Patch tokens alternate into sets A and B; each A token's best B match (cosine of the keys)
    is an edge, the ``r`` strongest edges merge (size-weighted mean). Prefix tokens (CLS,
    registers) never merge, as ToMe protects its class token.

    Args:
        x: (B, T, D) tokens; size: (B, T, 1) patches each token stands for; metric: (B, T, C)
            keys averaged over heads; r: merges, at most ``(T - n_prefix) // 2``.

    Returns:
        (B, T - r, D) tokens and (B, T - r, 1) sizes.
    """
    xp, sp = x[:, n_prefix:], size[:, n_prefix:]
    m = metric[:, n_prefix:]
    m = m / m.norm(dim=-1, keepdim=True)
    scores = m[:, ::2] @ m[:, 1::2].transpose(-1, -2)  # (B, |A|, |B|)
    node_max, node_idx = scores.max(-1)
    edges = node_max.argsort(-1, descending=True)[..., None]
    unm_idx, src_idx = edges[:, r:], edges[:, :r]
    dst_idx = node_idx[..., None].gather(1, src_idx)

    def merge(t: torch.Tensor) -> torch.Tensor:
        src, dst = t[:, ::2], t[:, 1::2]
        n, ta, c = src.shape
        unm = src.gather(1, unm_idx.expand(n, ta - r, c))
        src = src.gather(1, src_idx.expand(n, r, c))
        return torch.cat([unm, dst.scatter_reduce(1, dst_idx.expand(n, r, c), src, "sum")], 1)

    merged_size = merge(sp)
    merged = merge(xp * sp) / merged_size
    return torch.cat([x[:, :n_prefix], merged], 1), torch.cat([size[:, :n_prefix], merged_size], 1)


def _tome_attention(
    attn: nn.Module, x: torch.Tensor, size: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """timm ``Attention`` with ToMe's proportional attention (+log size on the keys' logits);
    also returns the keys averaged over heads, (B, T, head_dim), ToMe's similarity metric."""
    b, n, _ = x.shape
    q, k, v = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = None if size is None else size.log()[:, None, None, :, 0].to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
    out = attn.norm(out.transpose(1, 2).reshape(b, n, -1))
    return attn.proj_drop(attn.proj(out)), k.mean(1)


def tome_forward(model: nn.Module, images: torch.Tensor, r: int) -> torch.Tensor:
    """Pooled embedding of a timm ViT with ``r`` tokens merged in every block, between
    attention and MLP as ToMe does (so the token counts are :func:`tome_schedule`'s). Runs the
    blocks' own norms, LayerScale and MLP; ``r=0`` is the dense model."""
    m = model
    x = m.norm_pre(m._pos_embed(m.patch_embed(images)))
    n_prefix = int(m.num_prefix_tokens)
    size = x.new_ones(x.shape[0], x.shape[1], 1)
    merged = False
    for blk in m.blocks:
        a, metric = _tome_attention(blk.attn, blk.norm1(x), size if merged else None)
        x = x + blk.drop_path1(blk.ls1(a))
        rr = min(r, (x.shape[1] - n_prefix) // 2)
        if rr > 0:
            x, size = tome_merge(x, size, metric, rr, n_prefix)
            merged = True
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return m.forward_head(m.norm(x), pre_logits=True)


def tome_r_for(spec: ViTSpec, target_macs: float) -> int:
    """The ToMe ``r`` whose analytic MACs per image are closest to ``target_macs``."""
    best = min(range(spec.n_patches // 2 + 1),
               key=lambda r: abs(vit_macs(spec, tome_schedule(spec, r)) - target_macs))
    return best


# -- settings ---------------------------------------------------------------------------------
def settings(depth: int, p_values: list[float]) -> list[Setting]:
    blocks = (depth // 4, depth // 2, 3 * depth // 4)
    at = "@" + "/".join(str(b) for b in blocks)
    no_prune = ViTConfig(prune_blocks=())
    in_vit = ViTConfig(prune_blocks=blocks, prune_policy="ratio", keep_ratio=0.7)
    nucleus = lambda p: ViTConfig(prune_blocks=blocks, prune_policy="nucleus", prune_p=p)  # noqa: E731
    ratio = lambda r: TokenSelectConfig(policy="ratio", keep_ratio=r)  # noqa: E731
    nuc_prior = lambda p: TokenSelectConfig(policy="nucleus", p=p)  # noqa: E731
    rows = [
        Setting("wrapper, keep all", None, no_prune),
        Setting("prior ratio 0.5", ratio(0.5), no_prune),
        Setting("prior ratio 0.25", ratio(0.25), no_prune),
        *[Setting(f"prior nucleus p{p}", nuc_prior(p), no_prune) for p in p_values],
        Setting(f"in-ViT ratio 0.7 {at}", None, in_vit),
        *[Setting(f"in-ViT nucleus p{p} {at}", None, nucleus(p)) for p in p_values],
        Setting("prior 0.5 + in-ViT 0.7", ratio(0.5), in_vit),
        Setting("prior 0.25 + in-ViT 0.7", ratio(0.25), in_vit),
        *[Setting(f"prior nucleus p{p} + in-ViT nucleus p{p}", nuc_prior(p), nucleus(p))
          for p in p_values],
        Setting("prior p0.7 + in-ViT p0.9, pad", nuc_prior(0.7), nucleus(0.9), "pad"),
        Setting("prior p0.7 + in-ViT p0.9, bucket", nuc_prior(0.7), nucleus(0.9), "bucket"),
        Setting("prior p0.7, pad", nuc_prior(0.7), no_prune, "pad"),
        Setting("prior p0.7, bucket", nuc_prior(0.7), no_prune, "bucket"),
    ]
    return rows


#: ToMe rows are matched in GMACs to these settings (by name prefix)
TOME_TARGETS = ("in-ViT ratio 0.7", "prior 0.25 + in-ViT 0.7")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_small_patch16_224", help="timm ViT (random init)")
    ap.add_argument("--scorer", default="mobilenetv3_small_100", help="timm CNN of the scorer")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--p", type=float, nargs="+", default=[0.5, 0.7, 0.9],
                    help="nucleus p values swept for the prior and in the network")
    ap.add_argument("--slide", type=Path, default=REAL_SLIDE, help="the real slide")
    ap.add_argument("--synth-px", type=int, default=3072, help="synthetic slide side, px")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model = timm.create_model(args.model, pretrained=False, num_classes=0).eval()
    spec = ViTSpec.from_timm(model)
    grid = int(model.patch_embed.grid_size[0])
    b = args.batch
    full, coarse, tiles_note = batch_of_tiles(b, spec.img_size, args.slide, args.synth_px,
                                              args.seed)
    data = timm.data.resolve_data_config({}, model=model)
    mean = torch.tensor(data["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(data["std"]).view(1, 3, 1, 1)
    x = (to_input(full) - mean) / std

    scorer = build_scorer(ScorerConfig(model=args.scorer), grid)  # random init: no download
    scorer_macs = cnn_macs(scorer, (3, *coarse.shape[1:3]))
    imp = score_tiles(scorer, coarse, batch_size=b).patch  # (B, G, G)
    coarse_x = torch.from_numpy(coarse).permute(0, 3, 1, 2)

    runs: dict[str, Callable[[], object]] = {}
    with torch.inference_mode():
        dense_emb = model.forward_head(model.forward_features(x), pre_logits=True)
        # the ToMe implementation must be the dense model when it merges nothing
        assert float((tome_forward(model, x, 0) - dense_emb).abs().max()) < 1e-4
    runs["dense timm"] = lambda: model.forward_head(model.forward_features(x), pre_logits=True)
    runs["scorer"] = lambda: scorer(coarse_x)
    rows = settings(spec.depth, args.p)
    outputs: dict[str, PrunedOutput] = {}
    for s in rows:
        keep = None if s.prior is None else select_patches(imp, s.prior, grid=(grid, grid))
        wrapper = PrunedViT(model, s.vit, batching=s.batching)
        runs[s.name] = lambda w=wrapper, k=keep: w(x, k)
        with torch.inference_mode():
            outputs[s.name] = wrapper(x, keep)
    tallies = {
        name: vit_batch_macs(spec, out.tokens_per_image, cls_attn_blocks=out.cls_attn_blocks,
                             patches_embedded=out.patches_embedded)
        for name, out in outputs.items()
    }
    tome: dict[str, tuple[int, str]] = {}  # row name -> (r, matched setting)
    for target in TOME_TARGETS:
        ref = next(n for n in outputs if n.startswith(target))
        r = tome_r_for(spec, tallies[ref].vit / b)
        name = f"ToMe r={r} (≈ GMACs of {target})"
        tome[name] = (r, ref)
        runs[name] = lambda r=r: tome_forward(model, x, r)
    with torch.inference_mode():
        tome_emb = {name: tome_forward(model, x, r) for name, (r, _) in tome.items()}

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
    sg = scorer_macs / 1e9
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(
        f"# {args.model} (random init), batch {b}: {tiles_note}; 224 px tiles at 0.5 µm/px; "
        f"prior from the {args.scorer} scorer (random init) on 56 px coarse tiles at 2.0 µm/px"
    )
    print(
        f"# {args.threads} threads, torch {torch.__version__}, timm {timm.__version__}, "
        f"{platform.processor() or platform.machine()}, load avg {load[0]:.1f} at the end; "
        f"{args.reps} repetitions"
    )
    print(
        "| setting | patch tokens | img/s best | img/s median | speed-up | GMACs/img "
        "| +scorer | MACs vs dense | cos vs dense |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| dense timm | 100 % | {dense_ips:.1f} | {median('dense timm'):.1f} | 1.00x | "
        f"{dense_macs / 1e9:.2f} | – | 1.00 | 1 |"
    )
    print(
        f"| CNN scorer {args.scorer}, one coarse tile | – | {best('scorer'):.1f} | "
        f"{median('scorer'):.1f} | – | {sg:.3f} | – | {scorer_macs / dense_macs:.3f} | – |"
    )
    for s in rows:
        out, tally = outputs[s.name], tallies[s.name]
        ips = best(s.name)
        # Token share across the whole network: patch tokens x blocks, as the ViT saw them.
        t = out.tokens_per_image.double()
        share = float((t - spec.num_prefix_tokens).clamp_min(0).mean() / spec.n_patches)
        g = tally.vit / b / 1e9
        plus = f"{g + sg:.2f}" if s.prior is not None else "–"
        print(
            f"| {s.name} | {100 * share:.0f} % | {ips:.1f} | {median(s.name):.1f} | "
            f"{ips / dense_ips:.2f}x | {g:.2f} | {plus} | {tally.vit / tally.dense:.2f} | "
            f"{cosine(out.embedding, dense_emb):.3f} |"
        )
    for name, (r, _) in tome.items():
        sched = torch.tensor(tome_schedule(spec, r), dtype=torch.float64)
        share = float((sched - spec.num_prefix_tokens).clamp_min(0).mean() / spec.n_patches)
        macs = vit_macs(spec, tome_schedule(spec, r))
        ips = best(name)
        print(
            f"| {name} | {100 * share:.0f} % | {ips:.1f} | {median(name):.1f} | "
            f"{ips / dense_ips:.2f}x | {macs / 1e9:.2f} | – | {macs / dense_macs:.2f} | "
            f"{cosine(tome_emb[name], dense_emb):.3f} |"
        )
    counts = outputs["prior p0.7, pad"].tokens_per_image[:, 0, 0]
    print(
        f"\npadding vs bucketing ({len(set(counts.tolist()))} distinct token counts in {b} "
        f"images, {int(counts.min())}..{int(counts.max())} tokens entering block 0):"
    )
    for tail in ("prior p0.7 + in-ViT p0.9", "prior p0.7"):
        pad, bucket = f"{tail}, pad", f"{tail}, bucket"
        print(
            f"  {tail}: pad/bucket {best(pad) / best(bucket):.2f}x best, "
            f"{median(pad) / median(bucket):.2f}x median"
        )
    print("\ncos vs dense: random weights, a check of the plumbing, not of a trained model")


if __name__ == "__main__":
    main()
