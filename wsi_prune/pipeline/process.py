"""One slide through every stage (:func:`process_slide`), each a function over the slide's
store and the config:

1. :func:`wsi_prune.io.tiling.tile_slide` - tissue mask and coarse tiles in ``OUT/<id>.zarr``;
2. :func:`wsi_prune.pipeline.stages.triage` - CNN scores of every tile and patch, kept tiles;
3. :func:`wsi_prune.pipeline.stages.embed_kept` - the pruned ViT on the kept tiles only;
4. :func:`wsi_prune.pipeline.stages.slide_head` - the MIL head over their embeddings;
5. :func:`wsi_prune.outputs.writer.write_outputs` - heatmaps, GeoJSON, candidates.

A slide's results count as done only when the store's ``run_hash`` attribute equals the run
hash (the config hash plus the SHA-256 of every weight file, :meth:`RunConfig.run_hash`) and
its output folder exists: both are written last, so a run killed at any point is redone on the
next run rather than mistaken for complete. Many slides, resume, failure isolation and the run
lock live in :mod:`wsi_prune.pipeline.batch`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from wsi_prune._files import file_state
from wsi_prune.config import RunConfig
from wsi_prune.errors import (
    CorruptSlide,
    NoTissue,
    OutputConflict,
    SlideChanged,
    SlideError,
    UnsupportedSlide,
    WsiPruneError,
)
from wsi_prune.io import locks, store
from wsi_prune.io.slide import missing_reason
from wsi_prune.io.tiling import (
    check_unreadable,
    slide_tile_hash,
    tile_slide,
    unreadable_records,
)
from wsi_prune.models.factory import Models
from wsi_prune.outputs.candidates import FROC_DIR
from wsi_prune.outputs.frame import CONVENTION, ViewerFrame
from wsi_prune.outputs.heat import heat_map, patch_heat, tile_heat
from wsi_prune.outputs.writer import write_outputs
from wsi_prune.pipeline.checks import disk_full, disk_full_error
from wsi_prune.pipeline.inputs import SlideEntry
from wsi_prune.pipeline.stages import Progress, embed_kept, slide_head, triage
from wsi_prune.selection.macs import vit_macs

if TYPE_CHECKING:
    from wsi_prune.pipeline.ahead import Tiled

_logger = logging.getLogger(__name__)

STAGES = ("tiling", "triage", "vit", "mil", "outputs")


def run_complete(out: Path, entry: SlideEntry, config: RunConfig,
                 run_hash: str | None = None) -> bool:
    """Whether ``entry``'s outputs in ``out`` are complete for this config and these weights.

    Args:
        run_hash: :meth:`RunConfig.run_hash`, when already computed.
    """
    if not (out / f"{entry.id}.zarr" / "zarr.json").is_file():
        return False  # the common case of a new slide, without asking zarr
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
        "unreadable_tiles": result.get("unreadable_tiles", 0),
        "viewer_offset": ViewerFrame.of(attrs["slide"]).offset if "slide" in attrs else None,
        "token_fraction": result["token_fraction"], "gmacs": result["gmacs"],
        "gmacs_dense": result["gmacs_dense"],
    }
    for s in STAGES:
        row[f"sec_{s}"] = sec.get(s)
    row["sec_total"] = sum(sec[s] for s in STAGES if sec.get(s) is not None) if sec else None
    # tiled ahead (pipeline/ahead.py): sec_tiling is the build's own time, this what the slide
    # waited for it; manifest.json only
    row["sec_tiling_waited"] = sec.get("tiling_waited")
    return row


def process_slide(
    entry: SlideEntry, out: Path, config: RunConfig, models: Models | Callable[[], Models],
    device: str = "cpu", force: bool = False, scheduler: Any = "threads",
    progress: Callable[[str, int, int], None] | None = None, run_hash: str | None = None,
    tiled: Tiled | None = None, after_triage: Callable[[], None] | None = None,
    read_workers: int | None = None,
) -> dict[str, Any]:
    """Run every stage on one slide; return its ``predictions.csv`` row.

    Errors are raised (:func:`run_batch` records them); ``models`` may be a factory so that a
    skipped slide never builds them. ``run_hash``: :meth:`RunConfig.run_hash` when already
    computed (a batch hashes its weight files once).

    Args:
        tiled: the slide's store was built ahead by :class:`~wsi_prune.pipeline.ahead.
            TilingAhead`: its error, if any, is raised where the tiling would run; otherwise
            the store is only checked against the slide file (rebuilt if the file changed),
            even with ``force``. Its seconds are the slide's ``tiling`` seconds.
        after_triage: called once the slide's triage is done, before the ViT (a batch starts
            the next slide's tiling there).
        read_workers: threads reading the kept tiles for the ViT
            (:func:`~wsi_prune.pipeline.stages.embed_kept`; None: 1 on the CPU, more with a GPU).
    """
    out = Path(out)
    store_path = out / f"{entry.id}.zarr"
    run_hash = config.run_hash() if run_hash is None else run_hash
    if not force and run_complete(out, entry, config, run_hash):
        group = zarr.open_group(str(store_path), mode="r")
        _logger.info("%s: outputs complete for this config, skipping", entry.id)
        # a run killed between publishing and releasing its lock left the lock behind
        locks.clear_stale(out / entry.id)
        return _row_from_result(entry, "skipped", group.attrs["result"], dict(group.attrs))
    if not entry.path.exists():
        raise UnsupportedSlide(missing_reason(entry.path), entry.path)
    try:
        with locks.locked(out / entry.id):
            if not force:
                check_owner(store_path, entry)
            store.remove_stale_tmp(out / entry.id)  # pictures of a killed run, never published
            try:
                return _process_checked(entry, out, config, models, device, force, scheduler,
                                        progress, run_hash, tiled, after_triage, read_workers)
            except OSError as exc:
                if disk_full(exc):
                    _drop_stage_arrays(store_path)
                raise
    except OSError as exc:  # the lock file too: on a full disk it is the first write
        if disk_full(exc):
            raise disk_full_error(out, exc, f"writing the outputs of {entry.id}") from exc
        raise


#: the store's groups written after tiling; the tile store itself stays for the next run
_STAGE_GROUPS = ("triage", "vit", "mil", "heatmap")


def _drop_stage_arrays(store_path: Path) -> None:
    """Delete what a slide that hit a full disk wrote after its tiling: the disk room goes back
    to the other slides and to ``predictions.csv`` (a slide's triage and ViT arrays are
    dozens of files: on a tmpfs each takes a 4 KiB page at least)."""
    import shutil

    for name in _STAGE_GROUPS:
        shutil.rmtree(store_path / name, ignore_errors=True)


def _process_checked(entry, out, config, models, device, force, scheduler, progress, run_hash,
                     tiled, after_triage, read_workers):
    # Each stage reads the slide file again (tiling, full-resolution tiles, the thumbnail): a
    # file replaced midway would mix two slides in one result, so it is checked between
    # them, and a read that fails on a changed file says so.
    started = file_state(entry.path.stat())
    try:
        return _process_locked(entry, out, config, models, device, force, scheduler,
                               progress, run_hash, started, tiled, after_triage, read_workers)
    except SlideError as exc:
        if isinstance(exc, SlideChanged):
            raise
        try:
            _check_unchanged(entry, started, "the run")
        except SlideChanged as changed:
            raise SlideChanged(f"{changed.reason} (a read failed meanwhile: {exc.reason})",
                               entry.path) from exc
        raise


#: µm/px of the picture :func:`_no_tissue_hint` looks at
_HINT_MPP = 32.0


def _no_tissue_hint(entry: SlideEntry) -> str:
    """Why a slide may hold no tissue, when its picture says: empty glass, no colour at all (a
    greyscale or single-channel image) or dark throughout (a fluorescence or dark-field scan).
    The mask is made for bright-field colour slides (H&E). '' when none of these, or when the
    slide cannot be read."""
    from wsi_prune.io.slide import Slide

    try:
        with Slide(entry.path, entry.mpp) as slide:
            rgb = slide.read_thumbnail(max(_HINT_MPP, slide.mpp))
    except (WsiPruneError, OSError):
        return ""
    px = rgb.reshape(-1, 3).astype(np.int16)
    bright = px.max(1)
    chroma = bright - px.min(1)
    if bright.min() >= 200:
        return "; the slide looks like empty glass (nothing darker than glass in its picture)"
    if np.percentile(chroma, 99.5) <= 6:
        return ("; the image has no colour (greyscale or one channel): the tissue mask is made "
                "for bright-field colour (H&E) slides")
    if np.median(bright) < 100:
        return ("; the image is dark throughout (a fluorescence or dark-field scan?): the "
                "tissue mask is made for bright-field slides on white glass")
    return ""


def _too_small(attrs: Any) -> str:
    """The reason a slide has no tile at all: smaller than one tile ('' when the grid has
    tiles). ``attrs``: the tile store's attributes (slide size in level-0 px, its MPP, the
    grid)."""
    grid, info = attrs.get("grid") or {}, attrs.get("slide") or {}
    if grid.get("n_grid", 1) or not info:
        return ""
    mpp = float(attrs["mpp"])
    w, h = int(info["width"]), int(info["height"])
    side_um = grid["tile_px"] * grid["mpp"]
    return (f"the slide ({w}×{h} px at {mpp:.3g} µm/px: {w * mpp:.0f}×{h * mpp:.0f} µm) is "
            f"smaller than one tile ({grid['tile_px']} px at {grid['mpp']:g} µm/px: "
            f"{side_um:.0f} µm); check its --mpp or use a smaller tiling.tile_px")


def check_owner(store_path: Path, entry: SlideEntry) -> None:
    """Refuse to reuse ``OUT/<id>.zarr`` that an earlier run built from another slide.

    Ids are unique within a run, but two runs on one OUT may give one id to two slides (a run
    on ``sub1/a.svs``, then one on ``sub2/a.svs``). A store built from the same path, or from a
    file of the same name and size (the slide moved or copied), is this slide's.

    Raises:
        OutputConflict: the store records another slide file.
    """
    try:
        attrs = json.loads((store_path / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return
    rec = attrs.get("slide_file") or {}
    if not rec.get("path"):
        return
    was, now = Path(rec["path"]), Path(os.path.abspath(entry.path))
    try:
        size = now.stat().st_size
    except OSError:
        return
    if was == now or (was.name == now.name and rec.get("size_bytes") == size):
        return
    raise OutputConflict(
        f"holds the outputs of another slide ({was}), not of {now}; use another --out, give "
        "this slide another id in a slide list (path,id), or --force to replace them",
        store_path)


def _check_unchanged(entry: SlideEntry, before: tuple[int, int, int], stage: str) -> None:
    """Raise :class:`SlideChanged` if the slide file is not the one the slide started with."""
    try:
        now = file_state(entry.path.stat())
    except OSError as exc:
        raise SlideChanged(f"slide file vanished during {stage} ({exc.strerror}); run again",
                           entry.path) from exc
    if now != before:
        raise SlideChanged(f"slide file was replaced or modified during {stage} (inode, size "
                           "or mtime changed); its outputs were not marked complete: run again "
                           "to process the new file", entry.path)


def _process_locked(entry, out, config, models, device, force, scheduler, progress, run_hash,
                    started, tiled, after_triage, read_workers):
    seconds: dict[str, float] = {}
    store_path = out / f"{entry.id}.zarr"
    # Evaluation_FROC.py scores every file in froc/: a slide that fails now must not leave one
    (out / FROC_DIR / f"{entry.id}.csv").unlink(missing_ok=True)
    t = time.perf_counter()

    def stage_progress(name: str) -> Progress:
        return None if progress is None else (lambda done, total: progress(name, done, total))

    if tiled is not None and tiled.error is not None:
        raise tiled.error  # the build ahead failed: as if it had failed here
    # built ahead: only checked against the file as it is now (rebuilt if it changed)
    tile_slide(entry.path, store_path, config, mpp=entry.mpp, scheduler=scheduler,
               progress=stage_progress("tiling"), force=force and tiled is None)
    here = time.perf_counter() - t
    seconds["tiling"] = here + (tiled.seconds if tiled else 0.0)
    if tiled is not None:  # built under the previous slide's stages: what this slide waited
        seconds["tiling_waited"] = here + tiled.waited
    group = zarr.open_group(str(store_path), mode="r+")
    # A new result is about to be written: the old one must not look current meanwhile.
    for key in ("run_hash", "result"):
        if key in group.attrs:
            del group.attrs[key]
    n = int(group["tiles/coords"].shape[0])
    if n == 0:
        raise NoTissue(_too_small(group.attrs) or "no tissue tile at the configured threshold"
                       + _no_tissue_hint(entry), entry.path)
    if callable(models) and not isinstance(models, Models):
        models = models()

    t = time.perf_counter()
    tri = triage(group, config, models, stage_progress("triage"))
    for name in ("tile_score", "patch_importance", "embedding", "kept"):
        store.write_array(group, f"triage/{name}", tri[name])
    seconds["triage"] = time.perf_counter() - t
    if after_triage is not None:
        after_triage()  # tiling ahead here, not under triage's own torch: measured faster

    t = time.perf_counter()
    _check_unchanged(entry, started, "tiling and triage")
    vit = embed_kept(entry, group, config, models, np.flatnonzero(tri["kept"]).astype(np.int64),
                     tri["patch_importance"], device, stage_progress("vit"),
                     read_workers=read_workers)
    # tiles whose full-resolution read failed (on_corrupt_tile: skip) never reached the ViT
    tile_index = vit["tile_index"]
    coords = np.asarray(group["tiles/coords"][:])
    records = unreadable_records(vit["unreadable"], coords, "vit")
    store.write_array(group, "vit/unreadable", np.array([r["tile"] for r in records], np.int64),
                      records=records)
    n_bad = int(group["tiles/unreadable"].shape[0]) if "unreadable" in group["tiles"] else 0
    n_bad += len(records)
    if records:
        tri["kept"][[r["tile"] for r in records]] = False
        store.write_array(group, "triage/kept", tri["kept"])
        _logger.warning("%s: %d kept tiles unreadable at full resolution (first at level-0 "
                        "%s: %s)", entry.id, len(records), records[0]["level0_xy"],
                        records[0]["error"])
        check_unreadable(n_bad, n, config.tiling, entry.path, records[0]["error"])
        if not len(tile_index):
            raise CorruptSlide(f"every kept tile is unreadable at full resolution; first: "
                               f"{records[0]['error']}", entry.path)
    store.write_array(group, "vit/tile_index", tile_index)
    for name in ("embedding", "token_importance", "kept_tokens"):
        store.write_array(group, f"vit/{name}", vit[name])
    seconds["vit"] = time.perf_counter() - t

    t = time.perf_counter()
    prob, attention = slide_head(models, vit["embedding"])
    store.write_array(group, "mil/attention", attention.astype(np.float32))
    heat, source = tile_heat(tri["tile_score"], tri["kept"], attention,
                             config.mil.heat_vit_weight)
    store.write_array(group, "heatmap/tile", heat)
    store.write_array(group, "heatmap/source", source)
    gh, gw = models.grid
    store.write_array(group, "heatmap/patch", patch_heat(
        vit["token_importance"], vit["kept_tokens"][:, 0],
        tri["patch_importance"][tile_index], heat[tile_index]))
    # the slide-wide map as an OME-NGFF multiscale image (napari-ome-zarr), in µm
    hmap, hpx0 = heat_map(group)
    mpp = float(group.attrs["mpp"])
    store.write_multiscale(group, "heatmap/image", hmap, (mpp * hpx0, mpp * hpx0),
                           units="heat in [0, 1], NaN off tissue",
                           px_level0=hpx0)
    seconds["mil"] = time.perf_counter() - t

    spec = models.macs["spec"]
    dense_per_tile = vit_macs(spec)
    scorer_macs = n * models.macs["scorer_per_tile"]
    p = gh * gw
    label = int(prob >= config.mil.threshold)
    result = {
        "probability": prob, "label": label, "tissue_tiles": n,
        "kept_tiles": int(len(tile_index)), "unreadable_tiles": n_bad,
        # tokens that entered the ViT (stage 0, after the CNN prior) over all tissue tokens
        "token_fraction": float(vit["kept_tokens"][:, 0].sum()) / (n * p),
        "gmacs": (vit["macs"] + scorer_macs) / 1e9,
        "gmacs_dense": n * dense_per_tile / 1e9,
        "seconds": seconds,
    }
    t = time.perf_counter()
    _check_unchanged(entry, started, "the ViT stage")
    locks.verify(out / entry.id)
    write_outputs(group, out / entry.id, entry.id, prob, config, slide_path=entry.path,
                  mpp=entry.mpp, heat=(hmap, hpx0))
    seconds["outputs"] = time.perf_counter() - t
    result["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    _check_unchanged(entry, started, "the pictures")
    locks.verify(out / entry.id)
    # last: the marker that makes these outputs complete
    group.attrs.update({"result": result, "run_hash": run_hash,
                        "run_config": config.to_dict(), "models": models.describe,
                        "viewer_frame": {**ViewerFrame.of(group.attrs["slide"]).to_dict(),
                                         "convention": CONVENTION}})
    _logger.info("%s: p=%.3f, %d/%d tiles kept, %.1f%% tokens", entry.id, prob,
                 result["kept_tiles"], n, 100 * result["token_fraction"])
    return _row_from_result(entry, "ok", result, dict(group.attrs))


