"""Bounded read-ahead: background threads read the next batches while the caller works on the
current one (the ViT on the current batch).

:func:`prefetched` runs one iterator in one thread: the reads go through one slide handle in
the same order as without read-ahead, so the pixels, the tiles found unreadable and the handle
reopened after a damaged tile are exactly those of the sequential path; the thread only moves
*when* they happen. JPEG decoding and torch both release the GIL, so on a CPU one reader keeps
ahead of the ViT.

:func:`mapped_ahead` runs one function over a list of tasks in a pool of threads, for when
reading is slower than the model: on a GPU a pruned ViT-L takes well under a millisecond a
tile, a 224 px read about one. Each task is independent (each reader thread has its own slide
handle), so the results, and the exception of a task that fails, are the same as in order;
they are handed to the caller in order.

Memory is bounded: at most ``depth`` items (``max(depth, workers)`` with a pool) are read
ahead of the one the caller holds.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

A = TypeVar("A")
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


def mapped_ahead(fn: Callable[[A], T], tasks: Sequence[A], depth: int, workers: int = 1,
                 name: str = "wsi-prune-prefetch") -> Iterator[T]:
    """Yield ``fn(task)`` for each task, in order, computed ahead of the caller.

    With one worker this is :func:`prefetched` over the tasks (one thread, in order; ``depth``
    0: in the caller's thread). With more, a pool of ``workers`` threads runs up to
    ``max(depth, workers)`` tasks ahead of the caller; ``fn`` must then be safe to run for two
    tasks at once (give each thread its own slide handle). A task's exception is raised when
    the caller reaches that task, after the results before it (the same exception object).
    When the caller stops early, the tasks not started are cancelled and the running ones are
    waited for before this generator returns, so no read outlives the caller's ``with``
    block.

    Args:
        fn: the work of one task (read and decode one batch).
        tasks: what to do, in the order the results are wanted.
        depth: results computed ahead of the caller.
        workers: threads.
    """
    if workers <= 1:
        yield from prefetched((fn(t) for t in tasks), depth, name)
        return
    it = iter(tasks)
    pending: deque[Future[T]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix=name) as pool:
        try:
            for task in itertools.islice(it, max(depth, workers)):
                pending.append(pool.submit(fn, task))
            while pending:
                result = pending.popleft().result()
                for task in itertools.islice(it, 1):
                    pending.append(pool.submit(fn, task))
                yield result
        finally:
            for fut in pending:
                fut.cancel()
