"""Faults at scale, with real processes and real files (results in docs/reliability.md):

- ``kill``: ``wsi-prune run`` over 6 slides SIGKILLed at N seeded points (random moments,
  inside tiling, the ViT stage, publishing, and a Dask worker), resumed each time; each episode
  ends with a run to completion compared array by array with an undisturbed run
  (``tests/_faults.py`` has the harness and the checks).
- ``bad``: a catalogue of bad inputs, each run once; prints the one-line reason each got.
- ``soak``: 200 slides (180 good: copies of 20 distinct synthetic slides; 20 bad) through a
  Dask LocalCluster of 2 workers, one SIGKILLed midway: one row per slide, exit 3, every good
  slide's arrays identical to a one-process run (``OMP_NUM_THREADS=1``, the workers' thread
  count); wall time and peak RSS (VmHWM) of every worker process.

    python benchmarks/bench_faults.py kill --points 24 --out bench-out/faults
    python benchmarks/bench_faults.py kill --points 24 --run-arg=--tile-ahead --out ...
    python benchmarks/bench_faults.py bad --out bench-out/faults
    python benchmarks/bench_faults.py soak --n 200 --out bench-out/faults
    python benchmarks/bench_faults.py all --out bench-out/faults

Not a test; results as JSON under --out and as Markdown on stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import zarr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests._faults import (  # noqa: E402 - the harness lives with the tests
    CLI,
    DEMO_YAML,
    leftovers,
    plan,
    read_csv,
    run_episode,
    start_run,
    write_bad_files,
)
from wsi_prune.synth import write_dataset  # noqa: E402


def _machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"load {os.getloadavg()[0]:.1f} at start, {dt.date.today()}")


def _reference(slides: Path, out: Path, env: dict[str, str] | None = None) -> list[str]:
    if not (out / "manifest.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        proc = start_run([slides], out, env=env)
        if proc.wait() != 0:
            raise SystemExit(f"reference run failed: {proc.communicate()[1][-2000:]}")
    return [r["id"] for r in read_csv(out / "predictions.csv")]


# -- kill ---------------------------------------------------------------------------------------
def bench_kill(work: Path, n_points: int, seed: int, run_args: tuple[str, ...] = ()) -> dict:
    slides = work / "six"
    if not (slides / "labels.csv").is_file():
        write_dataset(slides, n=6, seed=3, size=1024)
    t0 = time.monotonic()
    ids = _reference(slides, work / "ref")
    ref_s = time.monotonic() - t0
    ref1 = work / "ref-1thread"
    _reference(slides, ref1, {"OMP_NUM_THREADS": "1"})
    rows, episodes = [], plan(seed, n_points, len(ids), max_time_s=max(2.0, 0.8 * ref_s))
    for k, points in enumerate(episodes):
        workers = any(p.stage == "worker" for p in points)
        out = work / f"kill-ep{k}"
        shutil.rmtree(out, ignore_errors=True)
        res = run_episode(slides, out, ref1 if workers else work / "ref", ids, points,
                          extra=run_args, env={"OMP_NUM_THREADS": "1"} if workers else None)
        for p in res.points:
            rows.append({"episode": k, "point": str(p.point), "reached": p.reached,
                         "after_s": p.seconds, "state": p.state, "done_before": p.done_before,
                         "survived": res.ok})
        print(f"episode {k}: {[str(p) for p in points]} -> "
              f"{'ok' if res.ok else res.problems}", flush=True)
    return {"reference_s": round(ref_s, 1), "points": rows,
            "tried": len(rows), "survived": sum(r["survived"] for r in rows),
            "reached": sum(r["reached"] for r in rows)}


# -- bad inputs ---------------------------------------------------------------------------------
def _bad_inputs(d: Path, good: Path) -> dict[str, str]:
    """name -> what it is; the files are made in ``d``."""
    import struct
    import zlib

    import tifffile
    from PIL import Image

    from tests.io.test_slide import corrupt_tiles

    rng = random.Random(0)
    made = {}

    def make(name: str, what: str, data: bytes | None = None) -> Path:
        p = d / name
        if data is not None:
            p.write_bytes(data)
        made[p.name] = what
        return p

    make("empty.svs", "empty file", b"")
    make("text.svs", "a text file named .svs", b"this is not a slide\n")
    make("random.tif", "2 kB of random bytes named .tif", rng.randbytes(2000))
    make("header_only.tiff", "a TIFF header pointing past the end",
         b"II*\0" + struct.pack("<I", 10_000_000))
    whole = good.read_bytes()
    make("truncated.svs", "a real slide cut to half its bytes", whole[: len(whole) // 2])
    corrupt_tiles(good, d / "corrupt_tiles.svs")
    made["corrupt_tiles.svs"] = "a real slide with its middle tiles overwritten"
    glass = np.full((1024, 1024, 3), 242, np.uint8)
    tifffile.imwrite(d / "blank_glass.tif", glass, tile=(256, 256), photometric="rgb",
                     resolution=(20000.0, 20000.0), resolutionunit="CENTIMETER")
    made["blank_glass.tif"] = "bare glass, no tissue (tiled TIFF, 0.5 µm/px)"
    tifffile.imwrite(d / "no_mpp.tif", glass, tile=(256, 256), photometric="rgb")
    made["no_mpp.tif"] = "a tiled TIFF without any resolution"
    Image.fromarray(glass).save(d / "photo.png")
    made["photo.png"] = "a PNG of bare glass, with mpp 0.5 in the slide list"
    Image.fromarray(glass).save(d / "snapshot.svs", format="JPEG")
    made["snapshot.svs"] = "a JPEG named .svs"

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    make("huge.png", "a PNG header claiming 12000x9000 px, with mpp 0.5",
         b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 12000, 9000, 8, 2, 0, 0,
                                                           0)) + chunk(b"IEND", b""))
    (d / "folder.svs").mkdir()
    made["folder.svs"] = "a directory named .svs"
    (d / "loop.svs").symlink_to("loop.svs")
    made["loop.svs"] = "a symlink to itself"
    (d / "gone.svs").symlink_to("nowhere.svs")
    made["gone.svs"] = "a broken symlink"
    if hasattr(os, "mkfifo"):
        os.mkfifo(d / "pipe.svs")  # opening it would wait for a writer
        made["pipe.svs"] = "a FIFO (named pipe) named .svs"
    locked = make("no_permission.svs", "a real slide with mode 000 (as root: still readable)",
                  whole)
    locked.chmod(0)
    return made


def bench_bad(work: Path) -> dict:
    slides = work / "six"
    if not (slides / "labels.csv").is_file():
        write_dataset(slides, n=6, seed=3, size=1024)
    d = work / "bad-inputs"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    made = _bad_inputs(d, slides / "synth_000.svs")
    out = work / "bad-out"
    shutil.rmtree(out, ignore_errors=True)
    # a slide list, so that the plain images get an mpp and the others none
    lst = work / "bad-inputs.csv"
    lst.write_text("path,mpp\n" + "".join(
        f"{d / name},{'0.5' if name.endswith('.png') else ''}\n" for name in sorted(made)))
    t0 = time.monotonic()
    proc = start_run([lst], out)
    rc = proc.wait()
    seconds = time.monotonic() - t0
    rows = {Path(r["path"]).name: r for r in read_csv(out / "predictions.csv")}
    table = [{"input": name, "what": made[name], "status": rows[name]["status"],
              "error": rows[name]["error"].replace(str(d) + "/", "")} for name in sorted(made)]
    # the 2 000-file folder of tests/pipeline/test_faults.py, timed
    big = work / "bad-2000"
    if not big.is_dir():
        big.mkdir()
        write_bad_files(big, 2000)
    out2 = work / "bad-2000-out"
    shutil.rmtree(out2, ignore_errors=True)
    t1 = time.monotonic()
    proc2 = start_run([big], out2)
    rc2 = proc2.wait()
    s2 = time.monotonic() - t1
    rows2 = read_csv(out2 / "predictions.csv")
    kinds: dict[str, int] = {}
    for r in rows2:
        k = r["error"].split(":", 1)[0]
        kinds[k] = kinds.get(k, 0) + 1
    return {"catalogue": table, "catalogue_rc": rc, "catalogue_s": round(seconds, 1),
            "folder_2000": {"rc": rc2, "rows": len(rows2), "seconds": round(s2, 1),
                            "reasons": kinds, "left": leftovers(out2)}}


# -- soak ---------------------------------------------------------------------------------------
def _soak_slides(work: Path, n: int, distinct: int, bad_share: float) -> tuple[Path, dict]:
    """``n`` slides: ``round(n * bad_share)`` bad files, the rest copies of ``distinct``
    synthetic slides. Returns the folder and {slide file name: source name or None (bad)}."""
    src = work / f"soak-src-{distinct}"
    if not (src / "labels.csv").is_file():
        write_dataset(src, n=distinct, seed=21, size=1024)
    d = work / f"soak-{n}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    rng = random.Random(7)
    n_bad = round(n * bad_share)
    bad_at = set(rng.sample(range(n), n_bad))
    sources = sorted(p.name for p in src.glob("*.svs"))
    origin: dict[str, str | None] = {}
    for i in range(n):
        name = f"s{i:03d}.svs"
        if i in bad_at:
            kind = len([b for b in bad_at if b < i]) % 4
            data = [b"", b"not a slide\n", rng.randbytes(4096),
                    (src / sources[0]).read_bytes()[:5000]][kind]
            (d / name).write_bytes(data)
            origin[name] = None
        else:
            s = sources[i % len(sources)]
            shutil.copy(src / s, d / name)
            origin[name] = s
    return d, origin


def _same_arrays(a: Path, b: Path) -> list[str]:
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    names = sorted(n for n, x in gb.members(max_depth=None) if isinstance(x, zarr.Array))
    got = sorted(n for n, x in ga.members(max_depth=None) if isinstance(x, zarr.Array))
    bad = [] if got == names else [f"arrays {sorted(set(got) ^ set(names))}"]
    bad += [n for n in names if n in got and not np.array_equal(ga[n][...], gb[n][...])]
    ra, rb = dict(ga.attrs["result"]), dict(gb.attrs["result"])
    ra.pop("seconds"), rb.pop("seconds")
    return bad + ([] if ra == rb else ["result"])


def _hwm_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def bench_soak(work: Path, n: int, distinct: int) -> dict:
    slides, origin = _soak_slides(work, n, distinct, 0.1)
    ref = work / f"soak-ref-{distinct}"
    _reference(work / f"soak-src-{distinct}", ref, {"OMP_NUM_THREADS": "1"})
    out = work / f"soak-{n}-out"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.monotonic()
    proc = start_run([slides], out, "--workers", "2", "--memory-limit", "0")
    driver = psutil.Process(proc.pid)
    peaks: dict[int, dict] = {}
    killed: dict[str, object] = {}
    while proc.poll() is None:
        try:
            children = driver.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for c in children:
            try:
                cmd = " ".join(c.cmdline())
            except psutil.Error:
                continue
            if "resource_tracker" in cmd:
                continue
            hwm = _hwm_kib(c.pid)
            if hwm is not None:
                peaks.setdefault(c.pid, {"first_seen_s": round(time.monotonic() - t0, 1)})
                peaks[c.pid]["peak_rss_mib"] = round(hwm / 1024, 1)
        pred = out / "predictions.csv"
        if not killed and pred.is_file() and len(read_csv(pred)) >= n // 2:
            for lock in out.glob("*.lock"):
                try:
                    pid = json.loads(lock.read_text())["pid"]
                except (OSError, ValueError, KeyError):
                    continue
                if pid != proc.pid:
                    os.kill(pid, signal.SIGKILL)
                    killed = {"pid": pid, "lock": lock.name,
                              "at_s": round(time.monotonic() - t0, 1),
                              "rows_done": len(read_csv(pred))}
                    break
        time.sleep(0.5)
    rc = proc.wait()
    wall = time.monotonic() - t0
    driver_hwm = None  # the driver is gone; its children were polled
    rows = read_csv(out / "predictions.csv")
    by_name = {}
    for r in rows:
        by_name.setdefault(Path(r["path"]).name, []).append(r)
    problems = [f"{name}: {len(v)} rows" for name, v in by_name.items() if len(v) != 1]
    problems += [f"{name}: no row" for name in origin if name not in by_name]
    ok = [name for name, src in origin.items() if src]
    bad = [name for name, src in origin.items() if not src]
    for name in ok:
        r = by_name[name][0]
        if r["status"] != "ok":
            problems.append(f"{name}: {r['status']} {r['error']}")
            continue
        src_id = Path(origin[name]).stem
        diff = _same_arrays(out / f"{r['id']}.zarr", ref / f"{src_id}.zarr")
        if diff:
            problems.append(f"{name}: differs from the one-process run in {diff}")
    for name in bad:
        r = by_name[name][0]
        if r["status"] != "failed" or not r["error"]:
            problems.append(f"{name}: bad input has status {r['status']}")
    return {"slides": n, "good": len(ok), "bad": len(bad), "rc": rc,
            "wall_s": round(wall, 1), "killed": killed, "processes": peaks,
            "driver_peak": driver_hwm, "problems": problems, "left": leftovers(out),
            "bad_reasons": sorted({by_name[b][0]["error"].split(":", 1)[0] for b in bad})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["kill", "bad", "soak", "all"])
    ap.add_argument("--out", type=Path, default=Path("bench-out/faults"))
    ap.add_argument("--points", type=int, default=24, help="kill points")
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--run-arg", action="append", default=[],
                    help="kill: passed to every run of the episodes (not the reference runs), "
                         "e.g. --run-arg=--tile-ahead; repeat for more")
    ap.add_argument("--n", type=int, default=200, help="soak slides")
    ap.add_argument("--distinct", type=int, default=20, help="distinct good soak slides")
    args = ap.parse_args()
    if not CLI.is_file():
        raise SystemExit(f"no wsi-prune console script at {CLI}")
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"# bench_faults {args.what}: {_machine()}; config {DEMO_YAML}", flush=True)
    results = {"machine": _machine()}
    if args.what in ("kill", "all"):
        results["kill"] = bench_kill(args.out, args.points, args.seed, tuple(args.run_arg))
        k = results["kill"]
        print(f"\nkill points survived: {k['survived']}/{k['tried']} "
              f"(trigger reached: {k['reached']}/{k['tried']})")
        print("| episode | point | reached | state when killed | survived |\n|---|---|---|---|---|")
        for r in k["points"]:
            print(f"| {r['episode']} | {r['point']} | {r['reached']} | {r['state']} | "
                  f"{r['survived']} |")
    if args.what in ("bad", "all"):
        results["bad"] = bench_bad(args.out)
        print("\n| input | what | status | reason |\n|---|---|---|---|")
        for r in results["bad"]["catalogue"]:
            print(f"| `{r['input']}` | {r['what']} | {r['status']} | {r['error']} |")
        print(f"\n2 000 bad files: {results['bad']['folder_2000']}")
    if args.what in ("soak", "all"):
        results["soak"] = bench_soak(args.out, args.n, args.distinct)
        s = results["soak"]
        print(f"\nsoak: {s['slides']} slides ({s['good']} good, {s['bad']} bad), exit {s['rc']}, "
              f"{s['wall_s']} s, killed {s['killed']}, problems {s['problems'][:10]}")
        for pid, p in s["processes"].items():
            print(f"  pid {pid}: {p}")
    (args.out / f"faults-{args.what}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
