"""Many slides: the batch driver, resume, failure isolation and the run lock.

:func:`run_batch` discovers the slides (:mod:`wsi_prune.pipeline.inputs`), holds
``OUT/.run.lock`` (:func:`run_lock`) so a second run on the same OUT refuses instead of racing
it, runs :func:`wsi_prune.pipeline.process.process_slide` on each (in this process or as Dask
tasks), records any slide's error as a ``failed`` row and goes on, and rewrites
``predictions.csv`` after every computed slide (failed and skipped ones at most once a second)
and ``manifest.json`` at the end, both atomically (:mod:`wsi_prune.pipeline.records`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import json
import logging
import os
import shutil
import time
import traceback
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from wsi_prune._devices import check_device, parse_device
from wsi_prune._files import write_text_atomic
from wsi_prune.config import RunConfig
from wsi_prune.errors import ConfigError, OutputConflict
from wsi_prune.io import locks
from wsi_prune.io.tiling import forget_kept_mask
from wsi_prune.models.factory import Models, apply_trained_configs, build_models, describe_models
from wsi_prune.pipeline.ahead import TilingAhead, auto_tile_ahead
from wsi_prune.pipeline.checks import (
    check_free_space,
    check_models,
    check_out,
    disk_full,
    disk_full_error,
)
from wsi_prune.pipeline.inputs import SlideEntry, discover
from wsi_prune.pipeline.process import process_slide, run_complete
from wsi_prune.pipeline.records import (
    csv_header,
    csv_line,
    failed_row,
    write_manifest,
    write_predictions,
)
from wsi_prune.pipeline.stages import auto_read_workers

_logger = logging.getLogger(__name__)

#: Seconds between rewrites of ``predictions.csv`` for failed and skipped slides.
_TABLE_EVERY_S = 1.0


def run_lock_path(out: str | os.PathLike[str], shard: tuple[int, int] | None = None) -> Path:
    """``OUT/.run.lock``, or ``OUT/.run.shard-i-of-K.lock`` for a shard: held by the run."""
    if shard is None:
        return Path(out) / ".run.lock"
    from wsi_prune.distributed.shards import shard_suffix

    return Path(out) / f".run{shard_suffix(*shard)}.lock"


@contextlib.contextmanager
def run_lock(out: Path, shard: tuple[int, int] | None = None) -> Iterator[Path]:
    """Hold the run-level lock of ``out`` (:func:`run_lock_path`, :func:`wsi_prune.io.locks.locked`
    semantics: a dead holder on this host is taken over).

    Without it, a second run on the same OUT would find every slide locked, record them as
    failed and overwrite the first run's ``predictions.csv`` and ``manifest.json``.

    Raises:
        OutputConflict: another live run holds the lock; names OUT and its pid.
    """
    lock = run_lock_path(out, shard)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(locks.locked(lock.with_suffix("")))
        except OutputConflict as exc:
            holder = getattr(exc, "holder", {})
            raise OutputConflict(
                f"another wsi-prune run (pid {holder.get('pid')} on {holder.get('host')}) is "
                f"writing to this output folder; wait for it or use another --out (if no run is "
                f"active, delete {lock})", out) from None
        yield lock


def run_batch(
    inputs: Sequence[str | os.PathLike[str]] | Sequence[SlideEntry],
    out: str | os.PathLike[str],
    config: RunConfig,
    *,
    mpp: float | None = None,
    device: str = "cpu",
    client: Any = None,
    force: bool = False,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
    audit: tuple[float, int] | None = None,
    tile_ahead: bool | None = None,
    read_workers: int | None = None,
) -> list[dict[str, Any]]:
    """Run the pipeline on every slide; one slide's failure never stops the others.

    The run holds ``OUT/.run.lock`` (a shard: ``OUT/.run.shard-i-of-K.lock``) throughout, so
    a second run on the same OUT refuses at once instead of racing this one. Before the first
    slide it checks what does not depend on a slide (:mod:`wsi_prune.pipeline.checks`): OUT
    is writable, the models build with their weights (in this process; with a ``client``
    they are built once here on the CPU to check them, then dropped), and OUT's device has
    room for the first slide to compute.

    Args:
        inputs: slide files, folders, CSV slide lists, or ready :class:`SlideEntry` objects.
        out: output folder (created).
        config: the run config.
        mpp: MPP override for slides without metadata, µm/px.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (:mod:`wsi_prune._devices`).
        client: a ``distributed.Client``: slides become tasks on its workers (models load
            once per worker); None: this process.
        force: recompute slides whose outputs are complete.
        shard: ``(i, k)``: only the i-th of k deterministic shards of the slide list; the
            shard writes its own ``predictions.shard-i-of-k.csv`` and manifest.
        progress: show progress bars (slides, and tile batches per slide).
        audit: ``(fraction, seed)``: then run the dense path on that seeded random fraction
            of the slides with a result, into ``OUT/.audit/dense``, and write ``OUT/audit.md``
            and ``audit.json`` (:mod:`wsi_prune.evaluation.audit`); the run's own outputs and
            hash are not touched. Not with ``shard``.
        tile_ahead: without a ``client``, build the next slide's tile store in a background
            thread while this slide runs its ViT and outputs (:mod:`wsi_prune.pipeline.ahead`);
            the results are the same either way. None: when a core is free for it
            (:func:`~wsi_prune.pipeline.ahead.auto_tile_ahead`: a GPU device, or torch using
            fewer threads than there are cores).
        read_workers: threads reading each slide's kept tiles for the ViT, each with its own
            slide handle (:func:`~wsi_prune.pipeline.stages.embed_kept`); the results are the
            same for any number. None: :func:`~wsi_prune.pipeline.stages.auto_read_workers`
            (1 on the CPU; with a GPU a quarter of the cores, at most 4), decided where the
            slide runs.

    Returns:
        The ``predictions.csv`` rows, in slide order.

    Raises:
        OutputConflict: another run holds this OUT (or this shard of it).
        ConfigError: ``device`` is misspelt or not present on this machine.
        OutputNotWritable: OUT cannot be created or written.
        ConfigError / CheckpointRefused: a model, policy or weights file of the config is
            unusable (found before the first slide).
        DiskFull: OUT's device has no room for the first slide, or for ``predictions.csv``.
    """
    # A missing GPU stops the run here, not slide by slide, where the models run here: without
    # Dask, or on a LocalCluster of this machine. A remote scheduler's or SLURM cluster's
    # driver often has no GPU: its workers check theirs (each slide fails, naming the cause).
    device = check_device(device) if _models_run_here(client) else parse_device(device)
    if audit is not None and (shard is not None or not 0 < audit[0] <= 1):
        raise ConfigError(f"an audit needs the whole run (no shard) and a fraction in (0, 1], "
                          f"got shard {shard}, fraction {audit[0]}")
    if read_workers is not None and read_workers < 1:
        raise ConfigError(f"read_workers must be >= 1, got {read_workers}")
    out = check_out(out)
    with run_lock(out, shard):
        try:
            rows = _run_locked(inputs, out, config, mpp, device, client, force, shard, progress,
                               tile_ahead, read_workers)
        finally:
            forget_kept_mask()  # the first slide's mask, when its tiling never took it
        if audit is not None:
            _audit(inputs, out, config, rows, audit, mpp, device, client, force, progress,
                   tile_ahead, read_workers)
        return rows


def _models_run_here(client: Any) -> bool:
    """Whether the models of this run run on this machine: no Dask client, or a client of a
    LocalCluster (its workers are this machine's processes)."""
    if client is None:
        return True
    return type(getattr(client, "cluster", None)).__name__ == "LocalCluster"


def _audit(inputs, out, config, rows, audit, mpp, device, client, force, progress,
           tile_ahead, read_workers) -> None:
    """The dense path on a seeded random share of the slides, compared with this run."""
    from wsi_prune.evaluation.audit import AUDIT_DIR, choose_audit_slides, write_audit

    if config.dense().hash() == config.hash():
        _logger.warning("the run is dense already: nothing to audit")
        return
    done = [r["id"] for r in rows if r["status"] in ("ok", "skipped")]
    chosen = choose_audit_slides(done, *audit)
    entries = (inputs if inputs and isinstance(inputs[0], SlideEntry)
               else discover(inputs, mpp, out=out))
    if chosen:
        _logger.info("audit: dense path on %s -> %s", ", ".join(chosen), out / AUDIT_DIR)
        run_batch([e for e in entries if e.id in chosen], out / AUDIT_DIR, config.dense(),
                  mpp=mpp, device=device, client=client, force=force, progress=progress,
                  tile_ahead=tile_ahead, read_workers=read_workers)
    write_audit(out, chosen, *audit, len(done), config.mil.threshold)


def _run_locked(inputs, out, config, mpp, device, client, force, shard, progress, tile_ahead,
                read_workers):
    from tqdm.auto import tqdm

    config = apply_trained_configs(config)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    if inputs and isinstance(inputs[0], SlideEntry):
        entries = list(inputs)
    else:
        entries = discover(inputs, mpp, out=out)
    if shard is not None:
        from wsi_prune.distributed.shards import shard_entries, shard_paths

        entries = shard_entries(entries, *shard)
        pred_path, manifest_path = shard_paths(out, *shard)
    else:
        pred_path, manifest_path = out / "predictions.csv", out / "manifest.json"
    # Weight files are hashed once per batch: they are part of the resume key and the manifest.
    digests = config.weight_digests()
    run_hash = config.run_hash(digests)
    _logger.info("%d slide(s) -> %s (config %s, run %s)", len(entries), out,
                 config.hash()[:12], run_hash[:12])

    rows: dict[str, dict[str, Any]] = {}
    cache: dict[str, Models] = {}
    # Before the first slide: what every slide would fail on alike stops the run here.
    todo = [e for e in entries if force or not run_complete(out, e, config, run_hash)]
    if todo:
        models = check_models(config, device if client is None else "cpu", digests)
        if client is None:
            cache["m"] = models
        del models  # with Dask, workers build their own
        # without Dask, the first slide's mask is kept for its tiling (masked once)
        check_free_space(out, config, todo, keep_mask=client is None)

    def get_models() -> Models:
        if "m" not in cache:
            cache["m"] = build_models(config, device, digests)
        return cache["m"]

    lines: dict[str, str] = {}  # each row formatted once: the table is rewritten many times
    last_write = [0.0]

    computed = {e.id for e in todo}

    def record(entry: SlideEntry, row: dict[str, Any]) -> None:
        if row["status"] == "skipped" and entry.id in computed:
            # Computed by this run: a Dask worker that held the finished result died before
            # it was gathered, the scheduler reran the task, and the rerun found the outputs
            # complete. The slide was computed here, not skipped.
            row = {**row, "status": "ok"}
        rows[entry.id] = row
        lines[entry.id] = csv_line(row)
        # A computed slide shows at once; failed and skipped rows (thousands of bad files, a
        # resumed batch) at most once a second: rewriting the whole table after each of 2 000
        # was quadratic, 3 of the 4 minutes such a folder took.
        now = time.monotonic()
        if row["status"] != "ok" and now - last_write[0] < _TABLE_EVERY_S:
            return
        last_write[0] = now
        try:
            write_text_atomic(pred_path, csv_header() + "".join(
                lines[e.id] for e in entries if e.id in lines))
        except OSError as exc:
            if not disk_full(exc):
                raise
            # the previous table stays whole (atomic write); the final write tries again
            _logger.error("%s: cannot update %s: no space left on the device", entry.id,
                          pred_path.name)

    bar = tqdm(total=len(entries), desc="slides", unit="slide", disable=not progress)
    # how the slides were run (the results do not depend on it): for the manifest
    execution: dict[str, Any] = {"device": device, "dask": client is not None,
                                 "tile_ahead": False, "read_workers": read_workers}
    if client is None:
        if tile_ahead is None:
            tile_ahead = auto_tile_ahead(device)
        if read_workers is None:
            read_workers = auto_read_workers(device)
        execution.update(tile_ahead=bool(tile_ahead), read_workers=read_workers)
        ahead = TilingAhead(out, config, force, run_hash) if tile_ahead else None
        try:
            _run_here(entries, out, config, get_models, device, force, progress, run_hash,
                      ahead, record, bar, read_workers)
        except BaseException:
            if ahead is not None:
                ahead.close(stop=True)  # an interrupted run stops the build
            raise
        if ahead is not None:
            ahead.close()
    else:
        from distributed import as_completed

        # One task per slide, carrying the config as JSON (a few KB), never the weights; each
        # slide's tile blocks become tasks of their own on the same cluster (tiling.py).
        config_json = json.dumps(config.to_dict(), sort_keys=True)
        # unique per call: two batches of one process on one client never share a future
        batch_key = uuid.uuid4().hex[:12]
        futures = {client.submit(_slide_task, e, str(out), config_json, device, force,
                                 run_hash, digests, read_workers, pure=False,
                                 key=f"slide-{e.id}-{batch_key}"): e
                   for e in entries}
        for fut in as_completed(futures):
            entry = futures[fut]
            try:
                row = fut.result()
            except Exception as exc:  # noqa: BLE001 - a lost worker etc.
                row = failed_row(entry, exc)
            record(entry, row)
            bar.update(1)
    bar.close()
    ordered = [rows[e.id] for e in entries]
    try:
        write_predictions(pred_path, ordered)
        write_manifest(manifest_path, config, ordered, started, describe_models(config, digests),
                       {"run_hash": run_hash, "shard": list(shard) if shard else None,
                        "out": str(out), "execution": execution})
    except OSError as exc:
        if disk_full(exc):
            raise disk_full_error(out, exc, f"writing {pred_path.name} and "
                                            f"{manifest_path.name}") from exc
        raise
    return ordered


def _run_here(entries, out, config, get_models, device, force, progress, run_hash, ahead,
              record, bar, read_workers) -> None:
    """The slides one after another in this process; with ``ahead``, the next slide's tiling
    starts when a slide's triage is done (:class:`~wsi_prune.pipeline.ahead.TilingAhead`)."""
    from tqdm.auto import tqdm

    for k, entry in enumerate(entries):
        bar.set_postfix_str(entry.id)
        inner: dict[str, Any] = {}

        def tick(stage: str, done: int, total: int, _inner=inner) -> None:
            b = _inner.get(stage)
            if b is None:
                b = _inner[stage] = tqdm(total=total, desc=f"  {stage}", unit="tile",
                                         leave=False, disable=not progress)
            b.update(done - b.n)

        tiled = ahead.take(entry) if ahead is not None else None
        after_triage = None
        if ahead is not None and k + 1 < len(entries):
            after_triage = functools.partial(ahead.start, entries[k + 1])
        try:
            row = process_slide(entry, out, config, get_models, device, force,
                                progress=tick if progress else None, run_hash=run_hash,
                                tiled=tiled, after_triage=after_triage,
                                read_workers=read_workers)
        except (KeyboardInterrupt, SystemExit):
            raise
        except OutputConflict as exc:
            row = failed_row(entry, exc)
        except Exception as exc:  # noqa: BLE001 - one slide must never stop the batch
            _logger.warning("%s failed: %s", entry.id, failed_row(entry, exc)["error"])
            _logger.debug("%s", traceback.format_exc())
            row = failed_row(entry, exc)
        finally:
            for b in inner.values():
                b.close()
        record(entry, row)
        bar.update(1)


def _slide_task(entry: SlideEntry, out: str, config_json: str, device: str, force: bool,
                run_hash: str | None = None, digests: dict[str, str | None] | None = None,
                read_workers: int | None = None) -> dict[str, Any]:
    """A slide as a Dask task: models load once per worker process and stay there
    (:func:`wsi_prune.distributed.worker_cache.get_models`); tile blocks are submitted back to the
    cluster. ``digests``: the weight files' SHA-256, computed once by the batch, never per
    worker."""
    from wsi_prune.distributed.gpus import worker_device
    from wsi_prune.distributed.worker_cache import get_models

    device = worker_device(device)  # "cuda" in a GPU-pinned worker: its own GPU, cuda:0
    config = RunConfig.from_dict(json.loads(config_json))
    torch.set_num_threads(1)
    try:
        check_device(device)  # a worker without the GPU fails the slide, naming the cause
        return process_slide(entry, Path(out), config,
                             lambda: get_models(config_json, device, run_hash, digests),
                             device, force, scheduler="dask-worker", run_hash=run_hash,
                             read_workers=read_workers)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - recorded, the batch goes on
        return failed_row(entry, exc)


def clean_out(out: Path, entry: SlideEntry) -> None:
    """Remove a slide's outputs (used by ``--force`` paths and tests)."""
    shutil.rmtree(out / f"{entry.id}.zarr", ignore_errors=True)
    shutil.rmtree(out / entry.id, ignore_errors=True)
