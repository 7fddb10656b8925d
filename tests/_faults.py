"""Fault injection with real processes and real files, shared by the fault tests
(``tests/pipeline/test_faults.py``) and the chaos benchmark (``benchmarks/bench_faults.py``).

A *kill point* is a moment in a ``wsi-prune run`` at which the whole run (its process group,
Dask workers included) is SIGKILLed, or, for ``worker``, one Dask worker process alone:

- ``time``: ``at_s`` seconds after the run started;
- ``tiling``: slide ``slide`` is writing its tile store (its hidden temporary store exists);
- ``vit``: slide ``slide`` is past triage and in the pruned-ViT stage (``triage/kept`` written,
  ``vit/`` not yet);
- ``publish``: slide ``slide`` is writing its pictures (its hidden temporary output folder
  exists), i.e. just before its outputs are published;
- ``worker``: a Dask worker holding a slide's lock (run with ``--workers 2``).

An *episode* starts from an empty OUT, runs and kills at each of its points in turn (each run
resumes the one before), then runs to the end and checks that nothing was lost: every array
of every store, the probabilities and the text outputs equal an undisturbed run's, every slide
that was complete when a run was killed was never recomputed, and no lock or temporary file is
left.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).with_name("wsi-prune")
DEMO_YAML = str(REPO / "pipelines" / "demo.yaml")
STAGES = ("time", "tiling", "vit", "publish", "worker")


@dataclass(frozen=True)
class KillPoint:
    stage: str
    slide: int = 0
    at_s: float = 0.0

    def __str__(self) -> str:
        if self.stage == "time":
            return f"time {self.at_s:.1f}s"
        if self.stage == "worker":
            return "a Dask worker"
        return f"{self.stage} of slide {self.slide}"


@dataclass
class PointResult:
    point: KillPoint
    reached: bool
    seconds: float
    state: str  # what OUT looked like right after the kill
    done_before: int  # slides complete before this run


@dataclass
class EpisodeResult:
    points: list[PointResult] = field(default_factory=list)
    final_rc: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.final_rc == 0


class Run(subprocess.Popen):
    """A ``wsi-prune run`` whose stdout and stderr go to temporary files: a pipe that nobody
    reads while waiting fills up (one warning per failed slide) and blocks the run."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self._files = (tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+"))
        super().__init__(args, stdout=self._files[0], stderr=self._files[1], text=True,
                         start_new_session=True, env=env)

    def communicate(self, input: Any = None, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        texts = []
        for f in self._files:
            f.seek(0)
            texts.append(f.read())
        return texts[0], texts[1]


def start_run(inputs: list[str | Path], out: Path, *extra: str,
              env: dict[str, str] | None = None) -> Run:
    """``wsi-prune run`` in its own session (so its process group, Dask workers included, can
    be killed at once)."""
    return Run([str(CLI), "run", *map(str, inputs), "--out", str(out), "--config", DEMO_YAML,
                "--quiet", *extra], env={**os.environ, **(env or {})})


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)
    proc.communicate()


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def outputs(out: Path, sid: str) -> dict[str, Any]:
    """Everything a slide's run computed: every array of its store, its result and its text
    outputs (timings and file times aside)."""
    g = zarr.open_group(str(out / f"{sid}.zarr"), mode="r")
    got: dict[str, Any] = {name: np.asarray(a[...]) for name, a in
                           g.members(max_depth=None) if isinstance(a, zarr.Array)}
    result = dict(g.attrs["result"])
    result.pop("seconds", None)
    got["result"] = result
    for name in ("candidates.csv", "regions.geojson"):
        got[name] = (out / sid / name).read_text()
    return got


def same_array(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal shape and values; NaN marks no tissue in the NGFF heat image, so there equal
    means both NaN."""
    return np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


def differences(out: Path, ref: Path, ids: list[str]) -> list[str]:
    """What differs between the outputs of ``ids`` in two OUT folders (empty: identical)."""
    problems = []
    for sid in ids:
        try:
            got, want = outputs(out, sid), outputs(ref, sid)
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            problems.append(f"{sid}: unreadable outputs ({type(exc).__name__}: {exc})")
            continue
        if got.keys() != want.keys():
            problems.append(f"{sid}: arrays {sorted(got.keys() ^ want.keys())} differ in presence")
        for key in want.keys() & got.keys():
            a, b = got[key], want[key]
            if not (same_array(a, b) if isinstance(a, np.ndarray) else a == b):
                problems.append(f"{sid}: {key} differs")
    return problems


def complete_ids(out: Path) -> set[str]:
    """Slides whose outputs are complete (the store's result marker and the pictures)."""
    done = set()
    for meta in out.glob("*.zarr/zarr.json"):
        try:
            attrs = json.loads(meta.read_text()).get("attributes", {})
        except (OSError, ValueError):
            continue
        sid = meta.parent.name[:-len(".zarr")]
        if "result" in attrs and "run_hash" in attrs and (out / sid / "heatmap.png").is_file():
            done.add(sid)
    return done


def stamps(out: Path, ids: set[str]) -> dict[str, tuple[int, int]]:
    return {sid: ((out / f"{sid}.zarr" / "zarr.json").stat().st_mtime_ns,
                  (out / sid / "heatmap.png").stat().st_mtime_ns) for sid in ids}


def leftovers(out: Path) -> list[str]:
    """Locks and temporary files or folders left in OUT."""
    return sorted(p.name for p in out.iterdir()
                  if ".tmp-" in p.name or p.name.endswith(".lock") or ".stale-" in p.name
                  or p.name.endswith(".tmp"))


def write_bad_files(folder: Path, n: int) -> None:
    """``n`` files that are no slides, named as slides (``.svs``, ``.tif``, ``.tiff``,
    ``.ndpi``), in turn: empty, text, random bytes, a truncated little-endian TIFF header and a
    big-endian TIFF header pointing at nothing. Deterministic (seed 0)."""
    rng = random.Random(0)
    for i in range(n):
        kind = i % 5
        p = folder / (f"f{i:04d}" + (".svs", ".svs", ".tif", ".tiff", ".ndpi")[kind])
        p.write_bytes([b"", b"not a slide\n", rng.randbytes(2000),
                       b"II*\0" + rng.randbytes(60), b"MM\0*\0\0\0\x08" + b"\0" * 10][kind])


def _fresh(paths: Any, since: float) -> bool:
    for p in paths:
        try:
            if p.stat().st_mtime >= since:
                return True
        except OSError:
            continue
    return False


def _reached(point: KillPoint, out: Path, sid: str, t0: float, t0_wall: float) -> bool:
    """Whether this run (started at ``t0``, wall clock ``t0_wall``) is at ``point``. What a
    killed run left behind does not count: only files made since this run started."""
    if point.stage == "time":
        return time.monotonic() - t0 >= point.at_s
    if point.stage == "tiling":
        return _fresh(out.glob(f".{sid}.zarr.tmp-*/zarr.json"), t0_wall)
    if point.stage == "vit":
        store = out / f"{sid}.zarr"
        return _fresh([store / "triage" / "kept" / "zarr.json"], t0_wall) and \
            not (store / "vit" / "tile_index").exists()
    if point.stage == "publish":
        return _fresh(out.glob(f".{sid}.tmp-*"), t0_wall)
    raise ValueError(point.stage)


def _worker_pid(out: Path, driver: int) -> int | None:
    for lock in out.glob("*.lock"):
        try:
            pid = json.loads(lock.read_text())["pid"]
        except (OSError, ValueError, KeyError):
            continue
        if pid != driver:
            return int(pid)
    return None


def describe_state(out: Path) -> str:
    """Where the run was when it was killed: the slides with a lock, temporary stores or
    folders, and how far each got."""
    parts = []
    for lock in sorted(out.glob("*.lock")):
        name = lock.name[:-len(".lock")]
        if name.startswith("."):
            continue
        sid = name[:-len(".zarr")] if name.endswith(".zarr") else name
        store = out / f"{sid}.zarr"
        if any(out.glob(f".{sid}.zarr.tmp-*")):
            stage = "tiling"
        elif any(p for p in out.glob(f".{sid}.tmp-*") if ".zarr" not in p.name):
            stage = "pictures/publishing"
        elif (store / "vit" / "tile_index").exists():
            stage = "MIL/heat"
        elif (store / "triage" / "kept").exists():
            stage = "ViT"
        elif store.exists():
            stage = "triage"
        else:
            stage = "opening"
        parts.append(f"{sid}: {stage}")
    return "; ".join(dict.fromkeys(parts)) or "between slides"


def run_episode(slides: Path, out: Path, ref: Path, ids: list[str], points: list[KillPoint],
                extra: tuple[str, ...] = (), timeout_s: float = 600.0,
                env: dict[str, str] | None = None) -> EpisodeResult:
    """Kill a run at each point in turn (each run resuming the last), then run to the end and
    compare with ``ref``. See the module docstring.

    ``env``: for every run; an episode with a ``worker`` point runs with
    ``OMP_NUM_THREADS=1``, because a Dask worker runs torch on one thread and its float results
    equal a one-process run's bit for bit only at the same thread count."""
    res = EpisodeResult()
    frozen: dict[str, tuple[int, int]] = {}  # complete slides and their file times
    inputs_before = _listing(slides)
    for point in points:
        done = complete_ids(out) if out.exists() else set()
        frozen |= stamps(out, done - frozen.keys())
        args = ("--workers", "2", "--memory-limit", "0") if point.stage == "worker" else ()
        t0_wall = time.time() - 0.01  # file times may round down
        proc = start_run([slides], out, *extra, *args, env=env)
        t0 = time.monotonic()
        reached = False
        sid = ids[point.slide] if point.stage not in ("time", "worker") else ""
        while proc.poll() is None and time.monotonic() - t0 < timeout_s:
            if point.stage == "worker":
                pid = _worker_pid(out, proc.pid) if out.exists() else None
                if pid is not None:
                    try:
                        os.kill(pid, signal.SIGKILL)
                        reached = True
                    except ProcessLookupError:
                        continue
                    break
            elif out.exists() and _reached(point, out, sid, t0, t0_wall):
                reached = True
                break
            time.sleep(0.005)
        seconds = time.monotonic() - t0
        if point.stage == "worker" and reached:
            # the run goes on without that worker: its tasks rerun elsewhere
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                kill_group(proc)
                res.problems.append(f"{point}: the run did not finish after a worker died")
                continue
            err = proc.communicate()[1]
            if rc != 0:
                res.problems.append(f"{point}: exit {rc} after a worker died: "
                                    f"{err.strip().splitlines()[-1:]}")
            state = "worker killed; the run went on"
        else:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            state = describe_state(out) if out.exists() else "before OUT existed"
            kill_group(proc)
        res.points.append(PointResult(point, reached, round(seconds, 2), state, len(done)))
        res.problems += _invariants(out, frozen, f"after {point}")
    final = start_run([slides], out, *extra, env=env)
    try:
        res.final_rc = final.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(final)
        res.problems.append("the final run did not finish")
        return res
    err = final.communicate()[1]
    if res.final_rc != 0:
        res.problems.append(f"final run exit {res.final_rc}: {err.strip()[-500:]}")
    res.problems += _invariants(out, frozen, "at the end")
    table = {r["id"]: r for r in read_csv(out / "predictions.csv")}
    if sorted(table) != sorted(ids):
        res.problems.append(f"predictions.csv lists {sorted(table)}, not {sorted(ids)}")
    res.problems += [p for p in (f"{sid}: status {r['status']}" for sid, r in table.items()
                                 if r["status"] not in ("ok", "skipped"))]
    res.problems += differences(out, ref, ids)
    if _listing(slides) != inputs_before:
        res.problems.append("the input folder changed: something was written outside OUT")
    if leftovers(out):
        res.problems.append(f"left in OUT: {leftovers(out)}")
    return res


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _invariants(out: Path, frozen: dict[str, tuple[int, int]], when: str) -> list[str]:
    """Slides complete earlier are untouched; every row reported ok is complete."""
    problems = []
    if not out.exists():
        return problems
    for sid, st in frozen.items():
        try:
            now = stamps(out, {sid})[sid]
        except OSError as exc:
            problems.append(f"{when}: {sid} was complete, now {exc.strerror}")
            continue
        if now != st:
            problems.append(f"{when}: {sid} was complete and was recomputed")
    pred = out / "predictions.csv"
    if pred.is_file():
        done = complete_ids(out)
        for row in read_csv(pred):
            if row["status"] == "ok" and row["id"] not in done:
                problems.append(f"{when}: {row['id']} reported ok but is not complete")
    return problems


def plan(seed: int, n_points: int, n_slides: int, per_episode: int = 4,
         stages: tuple[str, ...] = STAGES, max_time_s: float = 30.0) -> list[list[KillPoint]]:
    """Seeded kill points, grouped into episodes of ``per_episode``. Within an episode, slide
    targets never go backwards (a run resumes where the last was killed); a ``worker`` point
    (the run then finishes) is always an episode's last."""
    rng = random.Random(seed)
    episodes: list[list[KillPoint]] = []
    points: list[KillPoint] = []
    slide = 0
    for i in range(n_points):
        stage = stages[i % len(stages)] if i < len(stages) else rng.choice(stages)
        if stage == "time":
            points.append(KillPoint("time", at_s=round(rng.uniform(1.0, max_time_s), 2)))
        elif stage == "worker":
            points.append(KillPoint("worker"))
        else:
            slide = rng.randint(slide, min(n_slides - 1, slide + 2))
            points.append(KillPoint(stage, slide=slide))
        if len(points) == per_episode or stage == "worker" or i == n_points - 1:
            episodes.append(points)
            points, slide = [], 0
    return episodes
