"""One slide through every stage: the models of a run and the per-slide composition.

Per slide (:func:`process_slide`), each stage a function over the slide's store and the config:

1. :func:`wsi_prune.io.tiling.tile_slide` - tissue mask and coarse tiles in ``OUT/<id>.zarr``;
2. :func:`triage` - the CNN scores every coarse tile and every ViT patch inside it, and the
   tile policy keeps some tiles;
3. :func:`embed_kept` - full-resolution pixels are read for kept tiles only, the CNN patch map
   picks the tokens that enter the pruned ViT, which prunes further inside;
4. :func:`slide_head` - gated ABMIL over the kept tiles' embeddings;
5. :func:`wsi_prune.outputs.writer.write_outputs` - heatmaps, GeoJSON, candidates.

A slide's results count as done only when the store's ``run_hash`` attribute equals the run
hash (the config hash plus the SHA-256 of every weight file, :meth:`RunConfig.run_hash`) and
its output folder exists: both are written last, so a run killed at any point is redone on the
next run rather than mistaken for complete. Many slides, resume, failure isolation and the run
lock live in :mod:`wsi_prune.batch`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from wsi_prune.config import RunConfig
from wsi_prune.errors import UnsupportedSlide, WsiPruneError
from wsi_prune.io import locks, store
from wsi_prune.io.slide import Slide
from wsi_prune.io.tiling import slide_tile_hash, tile_slide
from wsi_prune.models.factory import Models

_logger = logging.getLogger(__name__)

PREDICTION_COLUMNS = (
    "id", "path", "status", "error", "probability", "label", "mpp", "mpp_source",
    "tissue_tiles", "kept_tiles", "token_fraction", "gmacs", "gmacs_dense",
    "sec_tiling", "sec_triage", "sec_vit", "sec_mil", "sec_outputs", "sec_total",
)
STAGES = ("tiling", "triage", "vit", "mil", "outputs")


# -- inputs ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SlideEntry:
    """One slide of a batch.

    Attributes:
        id: unique, filesystem-safe name of its outputs (``OUT/<id>.zarr``, ``OUT/<id>/``).
        path: the slide file.
        mpp: user MPP override for this slide (µm/px), or None.
        label: reference label from a slide list (0/1), or None.
    """

    id: str
    path: Path
    mpp: float | None = None
    label: int | None = None




# -- stages ------------------------------------------------------------------------------------
Progress = Callable[[int, int], None] | None


def triage(group: zarr.Group, config: RunConfig, models: Models, progress: Progress = None
           ) -> dict[str, np.ndarray]:
    """Score every coarse tile and every ViT patch in it; choose the tiles for the ViT.

    Returns:
        ``tile_score`` (N,), ``patch_importance`` (N, G, G), ``embedding`` (N, C), ``kept`` (N,).
    """
    from wsi_prune.models.scorer import score_tiles
    from wsi_prune.selection.tiles import select_tiles

    out = score_tiles(models.scorer, group["tiles/coarse"], config.scorer.batch_size,
                      config.scorer.threads, progress)
    patch, tile, emb = out.numpy()
    kept = select_tiles(tile, config.tile_select, np.asarray(group["tiles/grid"][:]), emb)
    return {"tile_score": tile, "patch_importance": patch, "embedding": emb, "kept": kept}


def embed_kept(
    entry: SlideEntry, group: zarr.Group, config: RunConfig, models: Models,
    tile_index: np.ndarray, patch_importance: np.ndarray, device: str = "cpu",
    progress: Progress = None,
) -> dict[str, Any]:
    """Read full-resolution pixels of the kept tiles only and run the pruned ViT on them.

    Args:
        tile_index: (K,) indices of kept tiles.
        patch_importance: (N, G, G) CNN patch maps of all tiles.

    Returns:
        ``embedding`` (K, D), ``token_importance`` (K, P), ``kept_tokens`` (K, S, P) bool,
        ``macs`` (MACs spent on the K tiles by the ViT).
    """
    from wsi_prune.selection.macs import vit_batch_macs
    from wsi_prune.selection.tokens import select_patches

    tcfg = config.tiling
    coords = np.asarray(group["tiles/coords"][:])
    tile_level0 = float(group.attrs["grid"]["tile_level0"])
    size0 = int(round(tile_level0))
    full = group["tiles/full"] if "full" in group["tiles"] else None
    k = len(tile_index)
    g = models.grid[0] * models.grid[1]
    embeddings, importance, kept_tokens = [], [], []
    macs = 0
    spec = models.macs["spec"]
    bs = config.vit.batch_size
    with Slide(entry.path, entry.mpp) as slide:
        for start in range(0, k, bs):
            idx = tile_index[start:start + bs]
            if full is not None:
                pix = np.stack([np.asarray(full[int(i)]) for i in idx])
            else:
                pix = np.stack([
                    slide.read(tuple(int(v) for v in coords[i]), (size0, size0), tcfg.mpp,
                               out_size=(tcfg.tile_px, tcfg.tile_px))
                    for i in idx
                ])
            x = torch.from_numpy(pix).to(device).permute(0, 3, 1, 2).float().div_(255.0)
            x = (x - models.vit_mean) / models.vit_std
            keep0 = select_patches(torch.from_numpy(patch_importance[idx]), config.token_select,
                                   grid=models.grid)
            with torch.inference_mode():
                res = models.vit(x, keep0)
            embeddings.append(res.embedding.float().cpu().numpy())
            importance.append(res.token_importance.float().cpu().numpy())
            kept_tokens.append(torch.stack([s.cpu() for s in res.kept], 1).numpy())
            # per image, padding not counted (attention on padded keys is masked work)
            macs += vit_batch_macs(spec, res.tokens_per_image,
                                   cls_attn_blocks=res.cls_attn_blocks).vit
            if progress is not None:
                progress(min(start + bs, k), k)
    d = models.mil.in_dim
    n_stages = 1 + len(config.vit.prune_blocks)
    return {
        "embedding": np.concatenate(embeddings) if k else np.zeros((0, d), np.float32),
        "token_importance": np.concatenate(importance) if k else np.zeros((0, g), np.float32),
        "kept_tokens": np.concatenate(kept_tokens) if k else np.zeros((0, n_stages, g), bool),
        "macs": macs,
    }


def slide_head(models: Models, embedding: np.ndarray) -> tuple[float, np.ndarray]:
    """Slide probability and MIL attention (K,) over the kept tiles' embeddings."""
    with torch.inference_mode():
        out = models.mil(torch.from_numpy(np.ascontiguousarray(embedding)).float())
    return float(out.prob), out.attention.float().cpu().numpy()


# -- one slide ---------------------------------------------------------------------------------
def run_complete(out: Path, entry: SlideEntry, config: RunConfig,
                 run_hash: str | None = None) -> bool:
    """Whether ``entry``'s outputs in ``out`` are complete for this config and these weights.

    Args:
        run_hash: :meth:`RunConfig.run_hash`, when already computed.
    """
    try:
        group = zarr.open_group(str(out / f"{entry.id}.zarr"), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError):
        return False
    want = config.run_hash() if run_hash is None else run_hash
    if not (group.attrs.get("run_hash") == want and "result" in group.attrs
            and (out / entry.id / "heatmap.png").is_file()):
        return False
    # the same slide as then: same file (size, mtime) and the same resolved MPP (another --mpp
    # on a slide without metadata moves every tile)
    try:
        return group.attrs.get("tile_hash") == slide_tile_hash(entry.path, config, entry.mpp)
    except WsiPruneError:
        return False  # process_slide reports why the slide cannot be opened


def _row_from_result(entry: SlideEntry, status: str, result: dict[str, Any],
                     attrs: dict[str, Any]) -> dict[str, Any]:
    sec = result.get("seconds", {})
    row = {
        "id": entry.id, "path": str(entry.path), "status": status, "error": "",
        "probability": result["probability"], "label": result["label"],
        "mpp": attrs.get("mpp"), "mpp_source": attrs.get("mpp_source"),
        "tissue_tiles": result["tissue_tiles"], "kept_tiles": result["kept_tiles"],
        "token_fraction": result["token_fraction"], "gmacs": result["gmacs"],
        "gmacs_dense": result["gmacs_dense"],
    }
    for s in STAGES:
        row[f"sec_{s}"] = sec.get(s)
    row["sec_total"] = sum(v for v in sec.values() if v is not None) if sec else None
    return row


def process_slide(
    entry: SlideEntry, out: Path, config: RunConfig, models: Models | Callable[[], Models],
    device: str = "cpu", force: bool = False, scheduler: Any = "threads",
    progress: Callable[[str, int, int], None] | None = None, run_hash: str | None = None,
) -> dict[str, Any]:
    """Run every stage on one slide; return its ``predictions.csv`` row.

    Errors are raised (:func:`run_batch` records them); ``models`` may be a factory so that a
    skipped slide never builds them. ``run_hash``: :meth:`RunConfig.run_hash` when already
    computed (a batch hashes its weight files once).
    """
    out = Path(out)
    store_path = out / f"{entry.id}.zarr"
    run_hash = config.run_hash() if run_hash is None else run_hash
    if not force and run_complete(out, entry, config, run_hash):
        group = zarr.open_group(str(store_path), mode="r")
        _logger.info("%s: outputs complete for this config, skipping", entry.id)
        return _row_from_result(entry, "skipped", group.attrs["result"], dict(group.attrs))
    if not entry.path.exists():
        raise UnsupportedSlide("no such file", entry.path)
    with locks.locked(out / entry.id):
        store.remove_stale_tmp(out / entry.id)  # pictures of a killed run, never published
        return _process_locked(entry, out, config, models, device, force, scheduler, progress,
                               run_hash)


def _process_locked(entry, out, config, models, device, force, scheduler, progress, run_hash):
    from wsi_prune.outputs.writer import write_outputs

    seconds: dict[str, float] = {}
    store_path = out / f"{entry.id}.zarr"
    t = time.perf_counter()

    def stage_progress(name: str) -> Progress:
        return None if progress is None else (lambda done, total: progress(name, done, total))

    tile_slide(entry.path, store_path, config, mpp=entry.mpp, scheduler=scheduler,
               progress=stage_progress("tiling"), force=force)
    seconds["tiling"] = time.perf_counter() - t
    group = zarr.open_group(str(store_path), mode="r+")
    # A new result is about to be written: the old one must not look current meanwhile.
    for key in ("run_hash", "result"):
        if key in group.attrs:
            del group.attrs[key]
    n = int(group["tiles/coords"].shape[0])
    if n == 0:
        from wsi_prune.errors import NoTissue

        raise NoTissue("no tissue tile at the configured threshold", entry.path)
    if callable(models) and not isinstance(models, Models):
        models = models()

    t = time.perf_counter()
    tri = triage(group, config, models, stage_progress("triage"))
    for name in ("tile_score", "patch_importance", "embedding", "kept"):
        store.write_array(group, f"triage/{name}", tri[name])
    seconds["triage"] = time.perf_counter() - t

    t = time.perf_counter()
    tile_index = np.flatnonzero(tri["kept"]).astype(np.int64)
    vit = embed_kept(entry, group, config, models, tile_index, tri["patch_importance"], device,
                     stage_progress("vit"))
    store.write_array(group, "vit/tile_index", tile_index)
    for name in ("embedding", "token_importance", "kept_tokens"):
        store.write_array(group, f"vit/{name}", vit[name])
    seconds["vit"] = time.perf_counter() - t

    t = time.perf_counter()
    prob, attention = slide_head(models, vit["embedding"])
    store.write_array(group, "mil/attention", attention.astype(np.float32))
    from wsi_prune.outputs.heat import patch_heat, tile_heat

    heat, source = tile_heat(tri["tile_score"], tri["kept"], attention)
    store.write_array(group, "heatmap/tile", heat)
    store.write_array(group, "heatmap/source", source)
    gh, gw = models.grid
    store.write_array(group, "heatmap/patch", patch_heat(
        vit["token_importance"], vit["kept_tokens"][:, 0],
        tri["patch_importance"][tile_index], heat[tile_index]))
    seconds["mil"] = time.perf_counter() - t

    spec = models.macs["spec"]
    from wsi_prune.selection.macs import vit_macs

    dense_per_tile = vit_macs(spec)
    scorer_macs = n * models.macs["scorer_per_tile"]
    p = gh * gw
    label = int(prob >= config.mil.threshold)
    result = {
        "probability": prob, "label": label, "tissue_tiles": n,
        "kept_tiles": int(len(tile_index)),
        # tokens that entered the ViT (stage 0, after the CNN prior) over all tissue tokens
        "token_fraction": float(vit["kept_tokens"][:, 0].sum()) / (n * p),
        "gmacs": (vit["macs"] + scorer_macs) / 1e9,
        "gmacs_dense": n * dense_per_tile / 1e9,
        "seconds": seconds,
    }
    t = time.perf_counter()
    write_outputs(group, out / entry.id, entry.id, prob, config, slide_path=entry.path,
                  mpp=entry.mpp)
    seconds["outputs"] = time.perf_counter() - t
    result["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    # last: the marker that makes these outputs complete
    group.attrs.update({"result": result, "run_hash": run_hash,
                        "run_config": config.to_dict(), "models": models.describe})
    _logger.info("%s: p=%.3f, %d/%d tiles kept, %.1f%% tokens", entry.id, prob,
                 result["kept_tiles"], n, 100 * result["token_fraction"])
    return _row_from_result(entry, "ok", result, dict(group.attrs))


# -- rows ------------------------------------------------------------------------------------
def failed_row(entry: SlideEntry, exc: BaseException) -> dict[str, Any]:
    """A ``predictions.csv`` row for a slide that failed, with a one-line reason."""
    if isinstance(exc, WsiPruneError):
        reason = f"{exc.kind}: {exc.one_line()}"  # e.g. "missing-mpp: /data/x.tif: ..."
    else:
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
    row = {c: None for c in PREDICTION_COLUMNS}
    row.update(id=entry.id, path=str(entry.path), status="failed", error=reason)
    return row
