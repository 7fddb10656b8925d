"""What a batch checks once, before its first slide: everything that does not depend on a
slide. A config naming a missing weights file, an unknown model, a read-only OUT or a full
disk used to make every slide ``failed`` with the same reason (400 identical rows and exit 3 on
a real batch); these checks stop the run at once with one message (exit 1) instead, and leave
per-slide failures to per-slide causes.

- :func:`check_out`: OUT can be created and written (a probe file).
- :func:`check_models`: the run's three models build with their weights: model and policy
  names resolve, weights files exist, load safely, match their sidecar JSON and the models.
- :func:`check_free_space`: the device of OUT has room for the first slide to compute.
- :func:`disk_full`: whether an error is ENOSPC/EDQUOT, so a slide that fills the disk fails
  with a clear reason.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

from wsi_prune.config import RunConfig
from wsi_prune.errors import DiskFull, OutputNotWritable, SlideError
from wsi_prune.pipeline.inputs import SlideEntry

_logger = logging.getLogger(__name__)

#: What a slide writes besides its tiles, bytes: two pictures of ~1100 px (about 1-3 MB each
#: as PNG), GeoJSON, candidates and the small arrays; a generous bound.
OUTPUTS_MARGIN_BYTES = 32 * 2**20
#: Slides tried when estimating the first slide's size (the first ones may be unreadable).
_ESTIMATE_TRIES = 5


def check_out(out: str | os.PathLike[str]) -> Path:
    """Create OUT if needed and check that files can be created in it.

    Raises:
        OutputNotWritable: OUT cannot be created, or a file cannot be created in it
            (read-only filesystem, permissions).
    """
    out = Path(out)
    probe = out / f".wsi-prune-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise OutputNotWritable(f"cannot write to the output folder ({why}); choose another "
                                "--out or fix its permissions", out) from exc
    return out


def check_models(config: RunConfig, device: str = "cpu",
                 digests: dict[str, str | None] | None = None):
    """Build the run's models once, as every slide would (:func:`build_models`).

    Returns:
        The :class:`~wsi_prune.models.factory.Models`, for the caller to reuse.

    Raises:
        ConfigError / CheckpointRefused: an unknown model, head or policy, a weights file that
            is missing, unsafe, unreadable, of another kind than its sidecar says, or that does
            not fit its model.
    """
    from wsi_prune.models.factory import build_models

    return build_models(config, device, digests)


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is ENOSPC or EDQUOT."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(out: Path, exc: BaseException, what: str) -> DiskFull:
    """A :class:`DiskFull` naming OUT, the free space left and what was being written."""
    try:
        free = f"{shutil.disk_usage(out).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return DiskFull(f"no space left on the device while {what} ({free}); nothing of it was "
                    "published: free space and run again", out)


def slide_bytes_bound(entry: SlideEntry, config: RunConfig,
                      keep_mask: bool = False) -> tuple[int, int]:
    """An upper bound of what a slide writes into OUT, and its tissue tile count.

    Its tissue tiles are found as the run finds them (thumbnail, tissue mask, grid: the
    same :func:`~wsi_prune.io.tiling.run_tissue_mask`, so the same bounded memory on a
    large slide), and counted uncompressed (coarse tiles, plus full tiles with
    ``store_tiles``), plus :data:`OUTPUTS_MARGIN_BYTES`.

    Args:
        entry: the slide.
        config: the run config.
        keep_mask: keep the mask for this process's tiling of the slide
            (:func:`~wsi_prune.io.tiling.run_tissue_mask`'s ``keep``).

    Raises:
        SlideError: the slide cannot be opened or read.
    """
    from wsi_prune.io.slide import Slide
    from wsi_prune.io.tiling import make_grid, run_tissue_mask

    with Slide(entry.path, entry.mpp) as slide:
        tm = run_tissue_mask(slide, config, keep=keep_mask)
        info = slide.info
    grid = make_grid(info, tm.mask, tm.mpp, config.tiling)
    t = config.tiling
    per_tile = t.coarse_px**2 * 3 + (t.tile_px**2 * 3 if t.store_tiles else 0)
    return len(grid) * per_tile + OUTPUTS_MARGIN_BYTES, len(grid)


def check_free_space(out: Path, config: RunConfig, todo: Sequence[SlideEntry],
                     keep_mask: bool = False) -> None:
    """Refuse to start when OUT's device cannot hold the first slide to compute.

    Args:
        out: the output folder.
        config: the run config.
        todo: the slides to compute, in order (complete ones left out). The first one that
            opens is measured (:func:`slide_bytes_bound`); unreadable ones are left to fail on
            their own.
        keep_mask: keep the measured slide's tissue mask for its tiling in this process
            (a run without Dask), which then does not mask it again.

    Raises:
        DiskFull: less free space than the first slide's bound.
    """
    free = shutil.disk_usage(out).free
    for entry in list(todo)[:_ESTIMATE_TRIES]:
        try:
            need, n = slide_bytes_bound(entry, config, keep_mask)
        except (SlideError, OSError):
            continue
        if free < need:
            raise DiskFull(
                f"{free / 2**20:.1f} MiB free on the output folder's device, and the first "
                f"slide to compute ({entry.path.name}: {n} tissue tiles) may need up to "
                f"{need / 2**20:.1f} MiB (its tiles uncompressed, plus pictures); free space "
                "or choose another --out", out)
        _logger.debug("%s: %.1f MiB free, first slide needs <= %.1f MiB", out, free / 2**20,
                      need / 2**20)
        return
