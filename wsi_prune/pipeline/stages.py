"""The model stages of one slide, each a function over the slide's store, the config and the
run's models (:class:`~wsi_prune.models.factory.Models`):

1. :func:`triage` - the CNN scores every coarse tile and every ViT patch inside it, and the tile
   policy keeps some tiles;
2. :func:`embed_kept` - full-resolution pixels are read for kept tiles only, the CNN patch map
   picks the tokens that enter the pruned ViT, which prunes further inside;
3. :func:`slide_head` - the MIL head over the kept tiles' embeddings.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import zarr

from wsi_prune.config import RunConfig
from wsi_prune.io import store
from wsi_prune.io.slide import Slide
from wsi_prune.io.tiling import read_tiles, usable_cores
from wsi_prune.models.factory import Models
from wsi_prune.models.scorer import score_tiles
from wsi_prune.pipeline.inputs import SlideEntry
from wsi_prune.pipeline.prefetch import mapped_ahead
from wsi_prune.selection.macs import vit_batch_macs
from wsi_prune.selection.tiles import select_tiles
from wsi_prune.selection.tokens import select_patches, slide_token_counts

Progress = Callable[[int, int], None] | None

#: full-resolution batches read ahead of the ViT: enough to hide a slow read behind one
#: batch of compute, while memory stays at a few batches (32 tiles of 224² px are 4.8 MB)
PREFETCH_BATCHES = 2
#: most reader threads :func:`auto_read_workers` gives a GPU run
MAX_AUTO_READERS = 4


def auto_read_workers(device: str) -> int:
    """Threads reading kept tiles for the ViT when the user did not say.

    One on the CPU: there the ViT is the slower side and takes the cores (a reader decodes a
    224 px tile in about 1 ms, the 6-block ViT-Ti at 5 % of tokens needs about 5 ms of it).
    With a GPU device, a quarter of this process's cores, 1 to :data:`MAX_AUTO_READERS`:
    there a pruned ViT-L takes well under a millisecond a tile, so one reader would set the
    pace, and the other cores tile the next slide and run the Dask blocks.
    """
    if device == "cpu":
        return 1
    return max(1, min(MAX_AUTO_READERS, usable_cores() // 4))


class _Handles:
    """One slide handle per reader thread, opened on its first read: the first opens the slide,
    the others are its :meth:`~wsi_prune.io.slide.Slide.sibling` handles (one cache of decoded
    JPEG tiles for all). :meth:`close` closes them all, after the readers are done."""

    def __init__(self, entry: SlideEntry) -> None:
        self._entry = entry
        self._local = threading.local()
        self._open: list[Slide] = []  # the first is the one the others came from
        self._lock = threading.Lock()

    def get(self) -> Slide:
        slide = getattr(self._local, "slide", None)
        if slide is None:
            with self._lock:
                slide = (self._open[0].sibling() if self._open
                         else Slide(self._entry.path, self._entry.mpp))
                self._open.append(slide)
            self._local.slide = slide
        return slide

    def close(self) -> None:
        with self._lock:
            for slide in reversed(self._open):  # siblings before the handle they share
                slide.close()
            self._open.clear()


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
    read_workers: int | None = None,
) -> dict[str, Any]:
    """Read full-resolution pixels of the kept tiles only and run the pruned ViT on them.

    Args:
        tile_index: (K,) indices of kept tiles.
        patch_importance: (N, G, G) CNN patch maps of all tiles.
        prefetch: batches read ahead by reader threads while the ViT runs on the current
            one (:func:`~wsi_prune.pipeline.prefetch.mapped_ahead`); 0 reads in this thread.
            The results are the same either way.
        read_workers: reader threads, each with its own slide handle; None:
            :func:`auto_read_workers` (1 on the CPU). The results are the same for any number.

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

    k = len(tile_index)
    g = models.grid[0] * models.grid[1]
    embeddings, importance, kept_tokens, done = [], [], [], []
    unreadable: list[tuple[int, str]] = []
    macs = 0
    spec = models.macs["spec"]
    bs = config.vit.batch_size

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
    workers = auto_read_workers(device) if read_workers is None else int(read_workers)
    reads = read_kept(entry, group, config, tile_index, prefetch, workers)
    try:
        for start, idx, pix, failed in reads:
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
    finally:
        reads.close()  # joins the readers (at once, also when the ViT raised)
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


def read_kept(entry: SlideEntry, group: zarr.Group, config: RunConfig, tile_index: np.ndarray,
              prefetch: int = PREFETCH_BATCHES, read_workers: int = 1,
              ) -> Iterator[tuple[int, np.ndarray, np.ndarray, list[tuple[int, str]]]]:
    """The kept tiles at full resolution, batch by batch (``vit.batch_size``), in order.

    Each batch is ``(start, tile indices, (B, px, px, 3) uint8 pixels, unreadable (tile,
    reason))``, ``start`` its offset in ``tile_index``. A tile whose read fails is, with
    ``tiling.on_corrupt_tile: skip``, left out of its batch and listed; with ``fail`` the
    error is raised at its batch. Read by ``read_workers`` threads (each with a slide handle,
    sharing the decoded JPEG tiles) up to ``prefetch`` batches ahead
    (:func:`~wsi_prune.pipeline.prefetch.mapped_ahead`); the batches are the same for any
    number. Close the iterator (or exhaust it) to join the readers and close the handles.
    """
    if read_workers < 1:
        raise ValueError(f"read_workers must be >= 1, got {read_workers}")
    tcfg = config.tiling
    coords = np.asarray(group["tiles/coords"][:])
    tile_level0 = float(group.attrs["grid"]["tile_level0"])
    full = group["tiles/full"] if "full" in group["tiles"] else None
    bs = config.vit.batch_size
    handles = _Handles(entry)

    def read_batch(start: int) -> tuple[int, np.ndarray, np.ndarray, list[tuple[int, str]]]:
        """(start, tile indices, (B, px, px, 3) uint8 pixels, unreadable (tile, reason)) of the
        batch from ``start``."""
        idx = tile_index[start:start + bs]
        if full is not None:
            return start, idx, np.stack([np.asarray(full[int(i)]) for i in idx]), []
        tiles, bad = read_tiles(handles.get(), coords[idx], tile_level0, tcfg.mpp, tcfg.tile_px,
                                skip_corrupt=tcfg.on_corrupt_tile == "skip")
        failed = [(int(idx[j]), msg) for j, msg in bad]
        if bad:
            good = np.setdiff1d(np.arange(len(idx)), [j for j, _ in bad])
            idx, tiles = idx[good], tiles[good]
        return start, idx, tiles, failed

    reads = mapped_ahead(read_batch, range(0, len(tile_index), bs), prefetch, read_workers,
                         "wsi-prune-read-kept")
    try:
        yield from reads
    finally:
        reads.close()  # joins the readers
        handles.close()


def slide_head(models: Models, embedding: np.ndarray) -> tuple[float, np.ndarray]:
    """Slide probability and MIL attention (K,) over the kept tiles' embeddings."""
    with torch.inference_mode():
        out = models.mil(torch.from_numpy(np.ascontiguousarray(embedding)).float()
                         .to(models.device))
    return float(out.prob), out.attention.float().cpu().numpy()
