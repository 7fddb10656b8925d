"""Exclusive locks on output paths: one slide's outputs, or a whole run's OUT.

A lock is a file ``<path>.lock`` holding ``{"pid", "host"}`` of its holder. A lock left by a
dead process on this host is taken over; a live holder makes :func:`locked` raise
:class:`~wsi_prune.errors.OutputConflict`, so two runs never write the same outputs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from wsi_prune.errors import OutputConflict

_logger = logging.getLogger(__name__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: An unreadable or empty lock file older than this (seconds) is a dead maker's leftover.
_EMPTY_LOCK_S = 10.0


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


@contextlib.contextmanager
def locked(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold ``<path>.lock`` (created exclusively) for the duration of a block.

    A lock left by a dead process on this host is taken over; a live holder raises
    :class:`OutputConflict` (its ``holder`` attribute: the lock's ``{"pid", "host"}``), so two
    runs on one output never write the same slide.
    """
    lock = Path(f"{path}.lock")
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, ValueError):
                holder = {}
            if not holder and _age_s(lock) > _EMPTY_LOCK_S:
                # created but never written: its maker died between the two (SIGTERM can
                # now land anywhere); a live maker writes it within microseconds
                _logger.warning("%s: taking over an empty lock file", lock)
                lock.unlink(missing_ok=True)
                continue
            same_host = holder.get("host") == me["host"]
            if same_host and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
                dead = holder["pid"]
                _logger.warning("%s: taking over a lock left by dead process %s", lock, dead)
                lock.unlink(missing_ok=True)
                continue
            err = OutputConflict(
                f"locked by another run (pid {holder.get('pid')} on {holder.get('host')}); "
                f"if no run is active, delete {lock}", path,
            )
            err.holder = holder  # type: ignore[attr-defined]
            raise err from None
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        break
    else:  # pragma: no cover - two take-overs in a row mean someone else races us
        raise OutputConflict("could not take the lock", path)
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)
