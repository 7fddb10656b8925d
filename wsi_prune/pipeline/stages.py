"""The model stages of one slide, each a function over the slide's store, the config and the
run's models (:class:`~wsi_prune.models.factory.Models`):

1. :func:`triage` - the CNN scores every coarse tile and every ViT patch inside it, and the tile
   policy keeps some tiles;
2. :func:`embed_kept` - full-resolution pixels are read for kept tiles only, the CNN patch map
   picks the tokens that enter the pruned ViT, which prunes further inside;
3. :func:`slide_head` - the MIL head over the kept tiles' embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import zarr

from wsi_prune.config import RunConfig
from wsi_prune.io import store
from wsi_prune.io.slide import Slide
from wsi_prune.io.tiling import read_tiles
from wsi_prune.models.factory import Models
from wsi_prune.models.scorer import score_tiles
from wsi_prune.pipeline.inputs import SlideEntry
from wsi_prune.pipeline.prefetch import prefetched
from wsi_prune.selection.macs import vit_batch_macs
from wsi_prune.selection.tiles import select_tiles
from wsi_prune.selection.tokens import select_patches, slide_token_counts

Progress = Callable[[int, int], None] | None

#: full-resolution batches read ahead of the ViT: enough to hide a slow read behind one
#: batch of compute, while memory stays at a few batches (32 tiles of 224² px are 4.8 MB)
PREFETCH_BATCHES = 2


def triage(group: zarr.Group, config: RunConfig, models: Models, progress: Progress = None
           ) -> dict[str, np.ndarray]:
    """Score every coarse tile and every ViT patch in it; choose the tiles for the ViT.

    Tiles the tiling stage could not read (``tiles/unreadable``: white stand-ins) score 0
    and are never kept.

    Returns:
        ``tile_score`` (N,), ``patch_importance`` (N, G, G), ``embedding`` (N, C), ``kept`` (N,).
    """

    out = score_tiles(models.scorer, store.TileShards(group["tiles/coarse"]),
                      config.scorer.batch_size,
                      config.scorer.threads, progress, precision=config.scorer.precision)
    patch, tile, emb = out.numpy()
    bad = np.asarray(group["tiles/unreadable"][:]) if "unreadable" in group["tiles"] else []
    if len(bad):
        tile[bad], patch[bad] = 0.0, 0.0
    kept = select_tiles(tile, config.tile_select, np.asarray(group["tiles/grid"][:]), emb)
    if len(bad):
        kept[bad] = False
    return {"tile_score": tile, "patch_importance": patch, "embedding": emb, "kept": kept}


def embed_kept(
    entry: SlideEntry, group: zarr.Group, config: RunConfig, models: Models,
    tile_index: np.ndarray, patch_importance: np.ndarray, device: str = "cpu",
    progress: Progress = None, prefetch: int = PREFETCH_BATCHES,
) -> dict[str, Any]:
    """Read full-resolution pixels of the kept tiles only and run the pruned ViT on them.

    Args:
        tile_index: (K,) indices of kept tiles.
        patch_importance: (N, G, G) CNN patch maps of all tiles.
        prefetch: batches read ahead by a reader thread while the ViT runs on the current
            one (:func:`~wsi_prune.pipeline.prefetch.prefetched`); 0 reads in this thread.
            The results are the same either way.

    With ``token_select.scope: slide`` the tokens per tile are counted once over all K tiles
    (:func:`~wsi_prune.selection.tokens.slide_token_counts`), so a batch mixes tiles of many
    and few tokens (padded to its largest inside the ViT; MACs count only real tokens).

    A kept tile whose full-resolution read fails to decode is, with ``tiling.on_corrupt_tile:
    skip``, left out (K counts only the tiles read) and reported in ``unreadable``; with
    ``fail`` the error propagates.

    Returns:
        ``tile_index`` (K,) the tiles embedded, ``embedding`` (K, D), ``token_importance``
        (K, P), ``kept_tokens`` (K, S, P) bool, ``macs`` (MACs spent on the K tiles by the
        ViT), ``unreadable`` [(tile index, reason)].
    """

    tcfg = config.tiling
    coords = np.asarray(group["tiles/coords"][:])
    tile_level0 = float(group.attrs["grid"]["tile_level0"])
    full = group["tiles/full"] if "full" in group["tiles"] else None
    k = len(tile_index)
    g = models.grid[0] * models.grid[1]
    embeddings, importance, kept_tokens, done = [], [], [], []
    unreadable: list[tuple[int, str]] = []
    macs = 0
    spec = models.macs["spec"]
    bs = config.vit.batch_size

    def batches(slide: Slide) -> Iterator[tuple[int, np.ndarray, np.ndarray,
                                                list[tuple[int, str]]]]:
        """(start, tile indices, (B, px, px, 3) uint8 pixels, unreadable (tile, reason)) per
        batch, in order; runs in the reader thread when ``prefetch`` > 0."""
        for start in range(0, k, bs):
            idx = tile_index[start:start + bs]
            if full is not None:
                yield start, idx, np.stack([np.asarray(full[int(i)]) for i in idx]), []
                continue
            tiles, bad = read_tiles(slide, coords[idx], tile_level0, tcfg.mpp, tcfg.tile_px,
                                    skip_corrupt=tcfg.on_corrupt_tile == "skip")
            failed = [(int(idx[j]), msg) for j, msg in bad]
            if bad:
                good = np.setdiff1d(np.arange(len(idx)), [j for j, _ in bad])
                idx, tiles = idx[good], tiles[good]
            yield start, idx, tiles, failed

    tok = config.token_select
    counts, given = None, tile_index
    if tok.scope == "slide" and tok.policy == "ratio":
        # tokens per tile, indexed by tile index (a batch may lose unreadable tiles)
        per_tile = slide_token_counts(torch.from_numpy(patch_importance[tile_index]),
                                      tok.keep_ratio, tok.min_tokens, grid=models.grid)
        counts = torch.zeros(len(patch_importance), dtype=torch.long)
        counts[torch.from_numpy(np.asarray(tile_index, np.int64))] = per_tile
        # tiles of alike token counts share a batch (a batch is padded to its largest);
        # the results are put back in the given order below
        tile_index = tile_index[np.argsort(-per_tile.numpy(), kind="stable")]
    with Slide(entry.path, entry.mpp) as slide:
        for start, idx, pix, failed in prefetched(batches(slide), prefetch,
                                                  "wsi-prune-read-kept"):
            unreadable += failed
            if not len(idx):
                continue
            done.append(idx)
            x = models.vit_input(pix)  # pinned host->device copy on CUDA
            keep0 = select_patches(torch.from_numpy(patch_importance[idx]), config.token_select,
                                   grid=models.grid,
                                   counts=None if counts is None else
                                   counts[torch.from_numpy(np.asarray(idx, np.int64))])
            with torch.inference_mode():
                res = models.vit(x, keep0)
            embeddings.append(res.embedding.float().cpu().numpy())
            importance.append(res.token_importance.float().cpu().numpy())
            kept_tokens.append(torch.stack([s.cpu() for s in res.kept], 1).numpy())
            # per image, padding not counted (attention on padded keys is masked work)
            macs += vit_batch_macs(spec, res.tokens_per_image,
                                   cls_attn_blocks=res.cls_attn_blocks,
                                   patches_embedded=res.patches_embedded).vit
            if progress is not None:
                progress(min(start + bs, k), k)
    d = models.mil.in_dim
    n_stages = 1 + len(config.vit.prune_blocks)
    k = sum(len(i) for i in done)
    if k and counts is not None:
        pos = np.empty(len(patch_importance), np.int64)
        pos[given] = np.arange(len(given))
        back = np.argsort(pos[np.concatenate(done)], kind="stable")
        done = [np.concatenate(done)[back]]
        embeddings = [np.concatenate(embeddings)[back]]
        importance = [np.concatenate(importance)[back]]
        kept_tokens = [np.concatenate(kept_tokens)[back]]
    return {
        "tile_index": np.concatenate(done).astype(np.int64) if k else np.zeros(0, np.int64),
        "embedding": np.concatenate(embeddings) if k else np.zeros((0, d), np.float32),
        "token_importance": np.concatenate(importance) if k else np.zeros((0, g), np.float32),
        "kept_tokens": np.concatenate(kept_tokens) if k else np.zeros((0, n_stages, g), bool),
        "macs": macs,
        "unreadable": unreadable,
    }


def slide_head(models: Models, embedding: np.ndarray) -> tuple[float, np.ndarray]:
    """Slide probability and MIL attention (K,) over the kept tiles' embeddings."""
    with torch.inference_mode():
        out = models.mil(torch.from_numpy(np.ascontiguousarray(embedding)).float()
                         .to(models.device))
    return float(out.prob), out.attention.float().cpu().numpy()
