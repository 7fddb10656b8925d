"""The next slide's tiling, built in a background thread while this slide runs its other stages.

Without Dask a batch runs its slides one after another (:mod:`wsi_prune.pipeline.batch`).
Tiling is reading, JPEG decoding, the tissue mask, zstd and file writes: numpy and C code
that release the GIL. Triage, the ViT and the MIL head are torch. :class:`TilingAhead` builds
slide k+1's tile store in one thread while slide k runs its ViT, MIL head and outputs, instead
of after them.

It pays when a core is free for the build, which :func:`auto_tile_ahead` turns it on for: a
GPU runs the models while the cores wait, or torch uses fewer threads than there are cores.
With torch on one thread of two cores, 16 slides ran 1.21-1.31x faster. With torch on both
cores the build only pre-empts torch's threads: 64 slides took the same time (-2.6 % to
+2.8 %) for 12-15 % more CPU time, so it is off there unless asked for (docs/benchmarks.md,
"The next slide tiled ahead"). The build starts after slide k's triage: started right after
its tiling, it competed with triage's CNN and 16 slides got slower.

What does not change:

- the store: the same :func:`~wsi_prune.io.tiling.tile_slide`, with Dask's synchronous
  scheduler in that thread (a sync build equals a threaded one, ``tests/io/test_tiling.py``);
- the locks and checks: the build holds the slide's lock (``OUT/<id>.lock``) and checks that
  ``OUT/<id>.zarr`` is this slide's first, as :func:`~wsi_prune.pipeline.process.process_slide`
  does; complete slides (resume) are not tiled at all;
- the errors: an exception raised by the build is carried to the slide's own turn and raised
  where its tiling would have run (the same exception object, so the same ``failed`` row).
  A slide the thread did not build (its lock or store held by another run, a missing file)
  goes through the sequential path and gets its error there;
- a replaced slide file: the slide's turn checks the store against the file as it is then
  (:func:`~wsi_prune.io.tiling.tile_slide` without ``force``: 4 ms when it matches) and
  rebuilds it when the file changed since.

Memory: at most one slide is tiled ahead, and only once the previous slide's triage is done,
so the peak is one tiling plus one slide's other stages, never two tilings at once. A slide
that fails before its triage ends starts no build: the slide after it tiles in its own turn.

An interrupted run (Ctrl-C, SIGTERM) stops the build at its next block of tiles: the
temporary store is deleted and the locks released, as when a slide's own tiling is
interrupted.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path

from wsi_prune.config import RunConfig
from wsi_prune.errors import OutputConflict
from wsi_prune.io import locks
from wsi_prune.io.tiling import tile_slide, usable_cores
from wsi_prune.pipeline.inputs import SlideEntry
from wsi_prune.pipeline.process import check_owner, run_complete

_logger = logging.getLogger(__name__)

#: seconds an interrupted run waits for the build to stop (the tissue mask before the first
#: block cannot be stopped: 1.2-1.6 s on a 50k² slide)
STOP_WAIT_S = 30.0


def auto_tile_ahead(device: str) -> bool:
    """Whether to tile ahead when the user did not say: when a core is free for the build.

    That is when the models run on a GPU (``device`` other than ``cpu``: the cores wait while
    the ViT runs there), or when torch's intra-op threads leave a core of this process's CPU
    set unused. When torch already uses every core, the build only competes with it: on 2
    cores and 64 slides the run took the same time with and without it, with 12-15 % more CPU
    time (docs/benchmarks.md, "The next slide tiled ahead").
    """
    import torch

    if device != "cpu":
        return True
    return torch.get_num_threads() < usable_cores()


class _Stopped(Exception):
    """Raised inside the build when the run is interrupted."""


@dataclasses.dataclass(frozen=True)
class Tiled:
    """A tile store built ahead of its slide's turn.

    Attributes:
        seconds: the build's own duration, s.
        waited: how long the slide's turn waited for the build to finish, s.
        error: the exception the build raised (None: the store is published).
    """

    seconds: float
    waited: float = 0.0
    error: BaseException | None = None


class TilingAhead:
    """One background thread that builds the next slide's tile store.

    Use: :meth:`start` with the next entry once the current slide's triage is done, then
    :meth:`take` at that entry's turn (it waits for the build), and :meth:`close` at the end.
    One build at a time: :meth:`start` while a build runs is an error.

    Args:
        out: the run's output folder.
        config: the run config (its tissue and tiling sections decide the store).
        force: rebuild stores that are complete (``--force``).
        run_hash: :meth:`RunConfig.run_hash`; complete slides are skipped as the run skips
            them.
    """

    def __init__(self, out: Path, config: RunConfig, force: bool, run_hash: str) -> None:
        self.out, self.config, self.force, self.run_hash = Path(out), config, force, run_hash
        self._thread: threading.Thread | None = None
        self._entry: SlideEntry | None = None
        self._result: Tiled | None = None
        self._stop = threading.Event()

    def start(self, entry: SlideEntry) -> None:
        """Begin building ``entry``'s store in the background thread."""
        if self._thread is not None:
            raise RuntimeError(f"tiling ahead: {self._entry.id} is still being built")
        self._entry, self._result = entry, None
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(entry,), daemon=True,
                                        name="wsi-prune-tile-ahead")
        self._thread.start()

    def take(self, entry: SlideEntry) -> Tiled | None:
        """Wait for ``entry``'s build; None when ``entry`` was not built ahead (not started
        for it, complete already, or left to its own turn)."""
        if self._thread is None or self._entry is None or self._entry.id != entry.id:
            return None
        t = time.perf_counter()
        self._thread.join()
        waited = time.perf_counter() - t
        result, self._thread, self._entry, self._result = self._result, None, None, None
        return None if result is None else dataclasses.replace(result, waited=waited)

    def close(self, stop: bool = False) -> None:
        """End the run's use: wait for a build still running, or with ``stop`` (an
        interrupted run) stop it at its next block of tiles and wait at most
        :data:`STOP_WAIT_S` for it to clean up."""
        if self._thread is not None:
            if stop:
                self._stop.set()
            self._thread.join(STOP_WAIT_S if stop else None)
        self._thread, self._entry, self._result = None, None, None

    def _check_stop(self, done: int, total: int) -> None:
        """The build's progress callback: where an interrupted run stops it."""
        if self._stop.is_set():
            raise _Stopped(f"stopped after {done} of {total} tiles: the run was interrupted")

    def _run(self, entry: SlideEntry) -> None:
        try:
            self._result = self._build(entry)
        except Exception as exc:  # noqa: BLE001 - the slide's own turn reports it
            _logger.debug("%s: not tiled ahead: %s", entry.id, exc)
            self._result = None

    def _build(self, entry: SlideEntry) -> Tiled | None:
        t = time.perf_counter()  # the checks count: the slide's turn would make them too
        if not self.force and run_complete(self.out, entry, self.config, self.run_hash):
            return None
        if not entry.path.exists():
            return None
        store_path = self.out / f"{entry.id}.zarr"
        try:
            with locks.locked(self.out / entry.id):
                if not self.force:
                    check_owner(store_path, entry)
                try:
                    tile_slide(entry.path, store_path, self.config, mpp=entry.mpp,
                               scheduler="sync", progress=self._check_stop, force=self.force)
                except (OutputConflict, _Stopped):
                    raise
                except Exception as exc:  # noqa: BLE001 - carried to the slide's turn
                    return Tiled(time.perf_counter() - t, error=exc)
                seconds = time.perf_counter() - t
        except (OutputConflict, _Stopped):
            return None  # another run holds the slide or its store: its turn says so
        _logger.info("%s: tiled ahead in %.2f s", entry.id, seconds)
        return Tiled(seconds)
