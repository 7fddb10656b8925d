"""Locks under contention, with real processes: a lock file is never seen half-written, a
stale lock is taken over by exactly one process, a holder on another host (another UTS
namespace, sharing this filesystem) keeps its lock by heartbeat and loses it once dead."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wsi_prune.errors import OutputConflict
from wsi_prune.io import locks

_CTX = mp.get_context("fork")


def _acquire_loop(path: str, n: int, start, conflicts) -> None:
    start.wait()
    seen = 0
    for _ in range(n):
        try:
            with locks.locked(path, heartbeat_s=60):
                pass
        except OutputConflict as exc:
            holder = getattr(exc, "holder", {})
            if not isinstance(holder.get("pid"), int):
                conflicts.put(json.dumps(holder))
            seen += 1
    conflicts.put(f"done {seen}")


def _read_loop(lock: str, stop, found) -> None:
    empty = full = 0
    while not stop.is_set():
        try:
            text = Path(lock).read_text()
        except FileNotFoundError:
            continue
        try:
            json.loads(text)["pid"]
            full += 1
        except (ValueError, KeyError):
            empty += 1
    found.put((empty, full))


def test_lock_file_is_never_seen_without_its_holder(tmp_path: Path) -> None:
    """Two processes take and release one lock 300 times each while a third reads the lock
    file in a tight loop: every read finds a whole JSON naming the holder, and every refusal
    names a pid (the lock used to be created empty and written afterwards: "pid None")."""
    path = str(tmp_path / "out" / ".run")
    Path(path).parent.mkdir()
    start, stop = _CTX.Event(), _CTX.Event()
    conflicts, found = _CTX.Queue(), _CTX.Queue()
    reader = _CTX.Process(target=_read_loop, args=(f"{path}.lock", stop, found))
    takers = [_CTX.Process(target=_acquire_loop, args=(path, 300, start, conflicts))
              for _ in range(2)]
    reader.start()
    for p in takers:
        p.start()
    start.set()
    msgs = [conflicts.get(timeout=120) for _ in takers]
    stop.set()
    empty, full = found.get(timeout=30)
    for p in (*takers, reader):
        p.join(timeout=30)
    assert all(m.startswith("done") for m in msgs), msgs  # no refusal without a pid
    assert empty == 0 and full > 0, (empty, full)
    assert sum(int(m.split()[1]) for m in msgs) > 0  # they really contended
    assert not list(Path(path).parent.iterdir())  # no lock, no temporary file left


def _hold_when_free(path: str, start, log) -> None:
    start.wait()
    try:
        with locks.locked(path, heartbeat_s=60):
            log.put(("in", os.getpid(), time.monotonic()))
            time.sleep(0.05)
            log.put(("out", os.getpid(), time.monotonic()))
    except OutputConflict:
        log.put(("refused", os.getpid(), time.monotonic()))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("round_", range(8))
def test_stale_lock_is_taken_over_by_one_process_at_a_time(tmp_path: Path, round_: int) -> None:
    """Six processes find the lock of a dead process at the same moment: holders never
    overlap (a stale lock is removed only under the take-over claim, after reading it again, so
    a taker never removes the lock a faster taker has just made)."""
    path = str(tmp_path / "slide")
    Path(f"{path}.lock").write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    start, log = _CTX.Event(), _CTX.Queue()
    procs = [_CTX.Process(target=_hold_when_free, args=(path, start, log)) for _ in range(6)]
    for p in procs:
        p.start()
    start.set()
    events = []
    while len([e for e in events if e[0] in ("out", "refused")]) < len(procs):
        events.append(log.get(timeout=60))
    for p in procs:
        p.join(timeout=10)
    held = sorted((t, kind) for kind, _, t in events if kind in ("in", "out"))
    assert held, events
    depth = 0
    for _, kind in held:
        depth += 1 if kind == "in" else -1
        assert depth in (0, 1), held  # never two holders at once
    assert len([e for e in events if e[0] != "out"]) == 6
    assert not Path(f"{path}.lock").exists()
    assert not [p for p in tmp_path.iterdir()
                if ".stale-" in p.name or p.suffix in (".tmp", ".takeover")]


def test_heartbeat_keeps_the_lease_and_verify_sees_a_take_over(tmp_path: Path) -> None:
    path = tmp_path / "slide"
    lock = Path(f"{path}.lock")
    with locks.locked(path, lease_s=0.4, heartbeat_s=0.05):
        old = time.time() - 3600
        os.utime(lock, (old, old))
        time.sleep(0.3)
        assert time.time() - lock.stat().st_mtime < 0.3  # touched again
        locks.verify(path)
        holder = json.loads(lock.read_text())
        assert holder["lease_s"] == 0.4 and holder["host"] == socket.gethostname()
        # another host took it over (this node looked dead): the holder finds out
        lock.write_text(json.dumps({**holder, "host": "node-b", "token": "theirs"}))
        with pytest.raises(OutputConflict, match="lost its lock .*node-b"):
            locks.verify(path)
    assert json.loads(lock.read_text())["token"] == "theirs"  # not removed: not ours


def test_lock_of_another_host_is_taken_over_when_its_lease_ran_out(tmp_path: Path,
                                                                   caplog) -> None:
    path = tmp_path / "slide"
    lock = Path(f"{path}.lock")
    remote = {"pid": 1, "host": "node-b", "token": "t", "lease_s": 30.0}
    lock.write_text(json.dumps(remote))
    with pytest.raises(OutputConflict, match="pid 1 on node-b"):
        with locks.locked(path):
            pass
    aged = time.time() - 31
    os.utime(lock, (aged, aged))
    with locks.locked(path):
        assert json.loads(lock.read_text())["host"] == socket.gethostname()
    assert "lease ran out" in caplog.text and "node-b" in caplog.text
    # without a lease in the file (an older version wrote it): the default lease applies
    lock.write_text(json.dumps({"pid": 1, "host": "node-b"}))
    aged = time.time() - locks.LEASE_S / 2
    os.utime(lock, (aged, aged))
    with pytest.raises(OutputConflict):
        with locks.locked(path):
            pass
    aged = time.time() - locks.LEASE_S - 1
    os.utime(lock, (aged, aged))
    with locks.locked(path):
        pass


def test_reused_pid_is_not_a_live_holder(tmp_path: Path) -> None:
    path = tmp_path / "slide"
    lock = Path(f"{path}.lock")
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "pid_start": locks._pid_start(os.getpid())}
    if me["pid_start"] is None:
        pytest.skip("no /proc here: process start times cannot be read")
    lock.write_text(json.dumps(me))
    with pytest.raises(OutputConflict):
        with locks.locked(path):
            pass
    # same pid, another start time: the pid now belongs to another process
    lock.write_text(json.dumps({**me, "pid_start": me["pid_start"] - 1}))
    with locks.locked(path):
        pass


_HOLDER = """
import sys, time
from wsi_prune.io import locks
with locks.locked(sys.argv[1], lease_s=1.0, heartbeat_s=0.1):
    print("held", flush=True)
    time.sleep(600)
"""


def test_holder_on_another_host_keeps_then_loses_its_lock(tmp_path: Path) -> None:
    """A real process in its own UTS namespace (hostname node-b) shares this filesystem, as a
    SLURM node shares scratch: its heartbeat keeps the lock past its 1 s lease; SIGKILLed, it
    is taken over once the lease runs out."""
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "--uts", "true"]).returncode != 0:
        pytest.skip("cannot make a UTS namespace here (unshare --uts needs root)")
    path = tmp_path / "slide"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [unshare, "--uts", "sh", "-c", 'hostname node-b && exec "$0" -c "$1" "$2"',
         sys.executable, _HOLDER, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert json.loads(Path(f"{path}.lock").read_text())["host"] == "node-b"
        time.sleep(2.5)  # 2.5 leases: only the heartbeat keeps it
        with pytest.raises(OutputConflict, match="on node-b"):
            with locks.locked(path):
                pass
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        killed = time.monotonic()
        while True:
            try:
                with locks.locked(path):
                    break
            except OutputConflict:
                assert time.monotonic() - killed < 10
                time.sleep(0.1)
        assert time.monotonic() - killed >= 0.5  # not before the lease ran out
    finally:
        proc.kill()
        proc.wait()


def test_take_over_waits_for_a_live_claim_and_clears_a_dead_ones(tmp_path: Path) -> None:
    """The take-over claim: while a live process holds it nobody removes the stale lock; a
    claim left by a dead taker is cleared, then the stale lock is taken over."""
    path = tmp_path / "slide"
    lock, claim = Path(f"{path}.lock"), tmp_path / ".slide.lock.takeover"
    stale = {"pid": _dead_pid(), "host": socket.gethostname()}
    lock.write_text(json.dumps(stale))
    live = {"pid": os.getpid(), "host": socket.gethostname(), "token": "x",
            "pid_start": locks._pid_start(os.getpid())}
    claim.write_text(json.dumps(live))
    assert locks._take_over(lock, stale) is False
    assert json.loads(lock.read_text()) == stale and claim.exists()  # untouched
    claim.write_text(json.dumps({**live, "pid": _dead_pid()}))
    assert locks._take_over(lock, stale) is False  # this call clears the dead claim ...
    assert not claim.exists() and lock.exists()
    with locks.locked(path) as held:  # ... and the next takes the stale lock over
        assert json.loads(held.read_text())["pid"] == os.getpid()
        # a lock that is no longer the one judged stale is never removed
        assert locks._take_over(lock, stale) is True and lock.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_clear_stale_removes_only_a_dead_holders_lock(tmp_path: Path) -> None:
    """clear_stale: no lock -> False; a live holder's lock stays; a dead process's lock (this
    host) and an expired lease of another host are removed, and the path can be locked again."""
    path = tmp_path / "slide"
    lock = Path(f"{path}.lock")
    assert locks.clear_stale(path) is False
    with locks.locked(path):
        assert locks.clear_stale(path) is False and lock.exists()
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    assert locks.clear_stale(path) is True and not lock.exists()
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "lease_s": 5.0}))
    assert locks.clear_stale(path) is False and lock.exists()  # lease still running
    old = time.time() - 60
    os.utime(lock, (old, old))
    assert locks.clear_stale(path) is True and not lock.exists()
    with locks.locked(path):
        pass
