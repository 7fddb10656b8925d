"""Exclusive locks on output paths: one slide's outputs, or a whole run's OUT.

A lock is a file ``<path>.lock`` holding the JSON ``{"pid", "host", "token", "lease_s",
"since", "pid_start"}`` of its holder. Three rules make it safe with several processes, on one
host or on several hosts sharing a filesystem (a SLURM cluster's scratch):

- **Published whole.** The holder writes its JSON to a temporary file beside the lock and
  hard-links it to the lock's name (``os.link`` fails when the name exists), so no reader ever
  sees a lock file that is empty or half-written. (Before, the file was created with
  ``O_EXCL`` and written afterwards; a second run reading in between reported "pid None on
  None".) On a filesystem without hard links it falls back to ``O_EXCL``, and an empty or
  unreadable lock younger than :data:`EMPTY_LOCK_S` counts as held.
- **A lease.** While held, a heartbeat thread (one per process) touches the lock's mtime every
  ``heartbeat_s`` seconds (default ``lease_s / 4``). A holder on this host is taken over as
  soon as its process is gone (checked by pid and the process's start time, so a reused pid is
  not mistaken for it). A holder on another host cannot be checked from here: it is taken over
  once its lock has not been touched for its ``lease_s`` (default :data:`LEASE_S`), i.e. its
  process or its node died. Hosts' clocks are compared through the file's mtime, so the lease
  must exceed their clock skew by a margin; 120 s does for NTP-synchronised nodes.
- **Race-free take-over.** Only a process holding the take-over claim
  ``.<name>.lock.takeover`` (published like a lock, held for the milliseconds of one check)
  removes a stale lock, and only after reading it again under the claim and finding the very
  lock it judged stale. Holders publish without the claim, but nobody else removes a lock, so
  the lock read under the claim is the one removed. (Before, a taker renamed the lock aside
  and put it back when it had become a newer holder's; a third process could publish in that
  gap, and two processes held the lock at once: seen once in 5 × 6 processes under load.) A
  claim whose process died (this host) or that is older than :data:`CLAIM_S` is cleared.

A live holder makes :func:`locked` raise :class:`~wsi_prune.errors.OutputConflict`, so two
runs never write the same outputs. A holder whose lease was taken over anyway (its node was
cut off for longer than the lease) learns it from :func:`verify`, which the pipeline calls
before it publishes anything.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wsi_prune.errors import OutputConflict

_logger = logging.getLogger(__name__)

#: Seconds without a heartbeat after which a lock held from another host is taken over.
LEASE_S = 120.0
#: An unreadable or empty lock file older than this (seconds) is a dead maker's leftover; only
#: the ``O_EXCL`` fallback (no hard links) can leave one.
EMPTY_LOCK_S = 10.0
#: A take-over claim older than this (seconds) is a dead taker's leftover: a live one holds it
#: for one read and one unlink.
CLAIM_S = 10.0
#: How long :func:`locked` keeps trying while other processes take a stale lock over, s.
TAKE_OVER_WAIT_S = 30.0
# errnos of os.link on a filesystem that has no hard links (some FUSE, SMB and object mounts)
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK,
             errno.ENOSYS}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ")"
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def _holder_alive(holder: dict[str, Any]) -> bool:
    """Whether the process named by a lock of this host still runs (and is the same one: a
    pid reused by another process has another start time)."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or not _pid_alive(pid):
        return False
    started = holder.get("pid_start")
    if isinstance(started, int):
        now = _pid_start(pid)
        if now is not None and now != started:
            return False
    return True


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _read(lock: Path) -> dict[str, Any] | None:
    """The holder a lock file names; ``{}`` when unreadable, None when there is no file."""
    try:
        holder = json.loads(lock.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _stale_reason(lock: Path, holder: dict[str, Any], host: str) -> str | None:
    """Why the lock ``holder`` read from ``lock`` may be taken over, or None if it is held."""
    if not holder:
        age = _age_s(lock)
        if age > EMPTY_LOCK_S:
            # created but never written: its maker (the O_EXCL fallback) died in between
            return f"an empty or unreadable lock file {age:.0f} s old"
        return None
    if holder.get("host") == host:
        if not _holder_alive(holder):
            return f"a lock left by dead process {holder.get('pid')}"
        return None
    lease = holder.get("lease_s")
    lease = float(lease) if isinstance(lease, (int, float)) and lease > 0 else LEASE_S
    age = _age_s(lock)
    if age > lease:
        return (f"a lock of {holder.get('host')} (pid {holder.get('pid')}) whose lease ran out "
                f"{age - lease:.0f} s ago (no heartbeat for {age:.0f} s > {lease:g} s)")
    return None


def _publish(lock: Path, me: dict[str, Any]) -> bool:
    """Create ``lock`` holding ``me``, whole. Returns False when the lock exists."""
    tmp = lock.with_name(f".{lock.name}.{me['token']}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as fh:
            json.dump(me, fh)
        try:
            os.link(tmp, lock)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
        # no hard links here: exclusive create, then write (readers see it empty meanwhile)
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(me, fh)
        return True
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _remove_if(path: Path, expected: dict[str, Any]) -> None:
    """Remove ``path`` if it still holds ``expected`` (rename aside, compare, put back if not).
    Used only for stale take-over claims, whose owner is dead: nobody races to replace them but
    other takers, and those hold a claim for milliseconds."""
    aside = path.with_name(f".{path.name}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if _read(aside) != expected:
        with contextlib.suppress(OSError):
            os.link(aside, path)
    aside.unlink(missing_ok=True)


def _take_over(lock: Path, stale: dict[str, Any]) -> bool:
    """Remove ``lock`` if it still is the ``stale`` one we judged, never a newer holder's.

    Returns:
        False when another process is taking it over right now (try again shortly).
    """
    claim = lock.with_name(f".{lock.name}.takeover")
    host = socket.gethostname()
    me = {"pid": os.getpid(), "host": host, "token": uuid.uuid4().hex,
          "pid_start": _pid_start(os.getpid())}
    if not _publish(claim, me):
        other = _read(claim)
        if other is not None and (_age_s(claim) > CLAIM_S or (
                other.get("host") == host and other and not _holder_alive(other))):
            _logger.warning("%s: clearing the take-over claim of a dead process", claim)
            _remove_if(claim, other)
        return False
    try:
        # Under the claim nobody else removes the lock, and its dead holder will not: the file
        # read here is the file unlinked below.
        if _read(lock) == stale:
            lock.unlink(missing_ok=True)
        return True
    finally:
        if (_read(claim) or {}).get("token") == me["token"]:
            claim.unlink(missing_ok=True)


class _Heartbeats:
    """One daemon thread per process touching the mtime of every lock this process holds,
    each every its own period (a thread per lock would cost a thread start and join per
    slide; a batch of 2 000 unreadable files takes 4 000 locks)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: dict[Path, tuple[str, float, float]] = {}  # lock -> (token, period, next)
        self._thread: threading.Thread | None = None

    def add(self, lock: Path, token: str, period_s: float) -> None:
        with self._cond:
            self._due[lock] = (token, period_s, time.monotonic() + period_s)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="wsi-prune lock heartbeat",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()

    def remove(self, lock: Path) -> None:
        with self._cond:
            self._due.pop(lock, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                due = [(lock, token) for lock, (token, _, at) in self._due.items() if at <= now]
                for lock, _ in due:
                    token, period, _ = self._due[lock]
                    self._due[lock] = (token, period, now + period)
                wake = min((at for _, _, at in self._due.values()), default=now + 60.0)
            for lock, token in due:
                self._beat(lock, token)
            with self._cond:
                self._cond.wait(max(0.0, wake - time.monotonic()))

    def _beat(self, lock: Path, token: str) -> None:
        try:
            os.utime(lock)
        except OSError:
            pass  # gone: verify() says so where it matters
        if (_read(lock) or {}).get("token") != token:
            _logger.error("%s: this process no longer holds the lock (taken over after its "
                          "lease ran out?)", lock)
            self.remove(lock)


_heartbeats = _Heartbeats()
_held: dict[str, str] = {}  # lock path -> our token, for verify()
_held_lock = threading.Lock()


def verify(path: str | os.PathLike[str]) -> None:
    """Check that this process still holds the lock of ``path`` (taken with :func:`locked`).

    Raises:
        OutputConflict: the lock file is gone or names another holder (a process on another
            host took it over after this one's heartbeat stopped for longer than the lease).
    """
    lock = Path(f"{path}.lock")
    with _held_lock:
        token = _held.get(str(lock))
    holder = _read(lock) or {}
    if token is None or holder.get("token") != token:
        raise OutputConflict(
            f"this run lost its lock (now held by pid {holder.get('pid')} on "
            f"{holder.get('host')}); nothing was published", path)


def _back_off() -> None:
    """Sleep 2-10 ms, jittered, while another process holds the take-over claim."""
    time.sleep(0.002 + 0.008 * (uuid.uuid4().int % 1000) / 1000)


def clear_stale(path: str | os.PathLike[str]) -> bool:
    """Remove ``<path>.lock`` if its holder is gone (the rules of :func:`locked`); leave a live
    holder's lock alone.

    A process killed after it published its outputs but before it released its lock leaves
    outputs that are complete and a lock nobody holds. A later run that finds the outputs
    complete skips the slide without taking the lock, so it clears such a leftover here.

    Returns:
        True when a stale lock was removed.
    """
    lock = Path(f"{path}.lock")
    host = socket.gethostname()
    for _ in range(100):  # another taker holds the claim for milliseconds
        holder = _read(lock)
        if holder is None:
            return False
        reason = _stale_reason(lock, holder, host)
        if reason is None:
            return False
        if _take_over(lock, holder):
            removed = _read(lock) is None
            if removed:
                _logger.info("%s: removed %s", lock, reason)
            return removed
        _back_off()
    return False


@contextlib.contextmanager
def locked(path: str | os.PathLike[str], lease_s: float = LEASE_S,
           heartbeat_s: float | None = None) -> Iterator[Path]:
    """Hold ``<path>.lock`` for the duration of a block.

    Args:
        path: what the lock protects; the lock file is ``<path>.lock``.
        lease_s: seconds without a heartbeat after which another host may take the lock over.
        heartbeat_s: seconds between heartbeats; default ``lease_s / 4``.

    Yields:
        The lock file.

    Raises:
        OutputConflict: a live holder has it (``holder`` attribute: its JSON), so two runs on
            one output never write the same slide.
    """
    lock = Path(f"{path}.lock")
    host = socket.gethostname()
    me = {"pid": os.getpid(), "host": host, "token": uuid.uuid4().hex,
          "lease_s": float(lease_s), "since": round(time.time(), 3),
          "pid_start": _pid_start(os.getpid())}
    deadline = time.monotonic() + TAKE_OVER_WAIT_S
    warned: set[str] = set()
    while True:
        if _publish(lock, me):
            break
        holder = _read(lock)
        if holder is None:
            continue  # released between our attempt and the read: try again
        reason = _stale_reason(lock, holder, host)
        if reason is None:
            err = OutputConflict(
                f"locked by another run (pid {holder.get('pid')} on {holder.get('host')}); "
                f"if no run is active, delete {lock}", path)
            err.holder = holder  # type: ignore[attr-defined]
            raise err from None
        if time.monotonic() > deadline:  # pragma: no cover - others keep taking it
            raise OutputConflict("could not take the lock: other processes keep taking it",
                                 path)
        if reason not in warned:
            warned.add(reason)
            _logger.warning("%s: taking over %s", lock, reason)
        if not _take_over(lock, holder):
            _back_off()  # another taker's turn
    with _held_lock:
        _held[str(lock)] = me["token"]
    _heartbeats.add(lock, me["token"], heartbeat_s if heartbeat_s else lease_s / 4)
    try:
        yield lock
    finally:
        _heartbeats.remove(lock)
        with _held_lock:
            _held.pop(str(lock), None)
        # only our own lock is removed: after a take-over the file is another holder's
        if (_read(lock) or {}).get("token") == me["token"]:
            lock.unlink(missing_ok=True)
