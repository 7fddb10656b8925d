"""Scaling out: slides/hour on one batch of synthetic slides with a Dask LocalCluster of 1 and
of 2 worker processes, and through SLURM (`submit_slurm`: an sbatch array of
`wsi-prune run --shard i/K` plus the merge job).

Every configuration starts from an empty output folder (no resume), and its cluster is started
before the clock starts; each worker's model loading is inside the timing. The SLURM timing runs
from the first sbatch to the end of the merge job, job start-up and Python imports included.
The goal on a 2-core machine is >= 1.8x from 1 to 2 workers. Rounds interleave the
configurations and the table reports the best and the median of each: on a shared machine the
best run is the one least disturbed by others.

    python benchmarks/bench_scale.py --out bench-out/scale
    python benchmarks/bench_scale.py --out bench-out/scale --n 8 --size 4096 --no-slurm
    python benchmarks/bench_scale.py --out bench-out/scale --markdown bench-out/scale/table.md

Not a test; SLURM must be running (scripts/start-slurm.sh) unless --no-slurm.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import psutil

from wsi_prune.config import RunConfig
from wsi_prune.distributed.clients import make_client
from wsi_prune.distributed.slurm import SlurmOptions, submit_slurm
from wsi_prune.pipeline.batch import run_batch
from wsi_prune.synth import write_dataset

REPO = Path(__file__).resolve().parents[1]


def slides(out: Path, n: int, size: int) -> Path:
    """The batch (written once, reused by later runs with the same n and size)."""
    folder = out / f"slides-{n}x{size}"
    if not (folder / "labels.csv").is_file():
        write_dataset(folder, n=n, size=size, seed=11)
    return folder


def run_in_process(folder: Path, out: Path, config: RunConfig) -> tuple[float, list]:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    rows = run_batch([folder], out, config, progress=False)
    return time.perf_counter() - t0, rows


def run_dask(folder: Path, out: Path, config: RunConfig, workers: int) -> tuple[float, list]:
    shutil.rmtree(out, ignore_errors=True)
    with make_client(workers=workers, memory_limit="4GB", dashboard_address=":0") as client:
        t0 = time.perf_counter()
        rows = run_batch([folder], out, config, client=client, progress=False)
        return time.perf_counter() - t0, rows


def run_slurm(folder: Path, out: Path, config_path: Path, shards: int, queue: str | None,
              command: str | None) -> tuple[float, list]:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    sub = submit_slurm([folder], out, shards, SlurmOptions(queue=queue, memory="3GB",
                                                           walltime="01:00:00"),
                       config_path=config_path, wsi_prune_cmd=command, run_args=["--quiet"])
    ids = ",".join(sub.job_ids)
    while subprocess.run(["squeue", "-h", "-j", ids], capture_output=True,
                         text=True).stdout.strip():
        time.sleep(0.5)
    dt_s = time.perf_counter() - t0
    pred = out / "predictions.csv"
    if not pred.is_file():
        raise SystemExit(f"SLURM run wrote no {pred}; see {out / 'logs'}")
    with open(pred, newline="") as fh:
        return dt_s, list(csv.DictReader(fh))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/scale"))
    ap.add_argument("--n", type=int, default=8, help="slides in the batch")
    ap.add_argument("--size", type=int, default=4096, help="slide side, level-0 px")
    ap.add_argument("--config", type=Path, default=REPO / "pipelines" / "demo.yaml")
    ap.add_argument("--no-slurm", action="store_true")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--queue", default=None, help="SLURM partition")
    ap.add_argument("--wsi-prune", default=None,
                    help="wsi-prune command the SLURM jobs run (default: this venv's)")
    ap.add_argument("--markdown", type=Path, default=None, help="write the results table here")
    args = ap.parse_args()

    config = RunConfig.from_yaml(args.config)
    folder = slides(args.out, args.n, args.size)
    # name -> [(seconds, rows, 1-min load average after the run)], one per round
    results: dict[str, list[tuple[float, list, float]]] = {}

    def timed(name: str, fn, *fn_args) -> None:
        # the load average after the run says whether others shared the cores meanwhile
        sec, rows = fn(*fn_args)
        results.setdefault(name, []).append((sec, rows, os.getloadavg()[0]))
        print(f"{name}: {sec:.1f} s, load {os.getloadavg()[0]:.2f}", flush=True)

    load0 = os.getloadavg()[0]
    one_name = "Dask LocalCluster, 1 worker"
    # rounds interleave the configurations, so a burst of load from elsewhere hits all alike
    for _ in range(args.repeats):
        timed("one process, no Dask", run_in_process, folder, args.out / "run-p", config)
        timed(one_name, run_dask, folder, args.out / "run-w1", config, 1)
        timed("Dask LocalCluster, 2 workers", run_dask, folder, args.out / "run-w2", config, 2)
        if not args.no_slurm:
            timed("SLURM array, 2 shards + merge job", run_slurm, folder,
                  args.out / "run-slurm", args.config.resolve(), 2, args.queue, args.wsi_prune)

    best = {name: min(r[0] for r in runs) for name, runs in results.items()}
    lines = [
        f"Scaling (benchmarks/bench_scale.py), {dt.date.today().isoformat()}, "
        f"{platform.node()}: {psutil.cpu_count(logical=True)} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.python_version()}; "
        f"{args.n} synthetic slides of {args.size}² px at 0.5 µm/px, "
        f"config {args.config.name}; best and median of {args.repeats} interleaved rounds; "
        f"1-min load average {load0:.2f} before the runs (other sessions share this machine).",
        "",
        "| configuration | slides ok | best s | median s | slides/hour (best) | "
        "vs 1 worker (best) | load after |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        secs = sorted(r[0] for r in runs)
        ok = min(sum(row["status"] in ("ok", "skipped") for row in r[1]) for r in runs)
        loads = "/".join(f"{r[2]:.1f}" for r in runs)
        lines.append(f"| {name} | {ok}/{len(runs[0][1])} | {secs[0]:.1f} | "
                     f"{statistics.median(secs):.1f} | {3600 * args.n / secs[0]:.0f} | "
                     f"{best[one_name] / secs[0]:.2f}x | {loads} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
