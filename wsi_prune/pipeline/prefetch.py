"""Bounded read-ahead: one background thread runs an iterator (the reads of the next batches)
while the caller works on the current item (the ViT on the current batch).

Why one thread and not a pool: the reads go through one slide handle in the same order as
without read-ahead, so the pixels, the tiles found unreadable and the handle reopened after a
damaged tile are exactly those of the sequential path; the thread only moves *when* they
happen. JPEG decoding and torch both release the GIL, so one reader overlaps the ViT; a
second reader would only help when reading is slower than the model.

Memory is bounded: at most ``depth`` items wait in the queue, plus the one the reader is
building and the one the caller holds.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_DONE = object()
# how often a blocked reader checks whether the caller gave up, s
_POLL_S = 0.05


class _Failed:
    """An exception raised by the reader, carried to the caller's thread."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def prefetched(items: Iterable[T], depth: int, name: str = "wsi-prune-prefetch") -> Iterator[T]:
    """Yield ``items`` in order, produced by a background thread up to ``depth`` items ahead.

    An exception raised while producing an item is raised here, in the caller's thread, when
    the caller reaches that item (the same exception object: a ``CorruptSlide`` still names
    its file), after the items before it. When the caller stops early (an exception in its
    own work, or ``close()``), the reader stops at its next item and is joined before this
    generator returns, so no read outlives the ``with Slide(...)`` block around it.

    Args:
        items: an iterable whose iteration does the slow work (read and decode).
        depth: items produced ahead of the caller; 0 produces them in the caller's thread
            (no thread at all).
    """
    if depth <= 0:
        yield from items
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(x: object) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for x in items:
                if not put(x):
                    return
        except BaseException as exc:  # carried to the caller, who re-raises it
            put(_Failed(exc))
            return
        put(_DONE)

    reader = threading.Thread(target=run, name=name, daemon=True)
    reader.start()
    try:
        while True:
            x = q.get()
            if x is _DONE:
                return
            if isinstance(x, _Failed):
                raise x.exc
            yield x
    finally:
        stop.set()
        reader.join()
