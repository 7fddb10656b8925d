"""Scale-out on real engines: Dask LocalClusters (including a worker SIGKILLed mid-run), an
external scheduler, and a real single-node SLURM started by scripts/start-slurm.sh (sbatch
arrays of `wsi-prune run --shard` and a dask-jobqueue SLURMCluster)."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask
import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from tests._paths import REPO
from wsi_prune.cli.distributed import cluster_options, merge, parse_shard, submit
from wsi_prune.distributed import worker_cache
from wsi_prune.distributed.clients import ClusterRequest, make_client
from wsi_prune.distributed.shards import merge_outputs, shard_entries, shard_paths
from wsi_prune.distributed.slurm import SlurmOptions, merge_script, sbatch_script
from wsi_prune.errors import ConfigError, OutputConflict, ShardsMissing, WsiPruneError

COLUMNS = ["id", "path", "status", "error", "probability", "sec_total"]


# -- shards --------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,k", [(0, 1), (1, 3), (7, 1), (7, 3), (10, 4), (12, 12), (5, 8)])
def test_shard_entries_cover_every_slide_exactly_once(n: int, k: int) -> None:
    from wsi_prune.pipeline.inputs import SlideEntry

    entries = [SlideEntry(f"s{j:02d}", Path(f"/x/s{j:02d}.svs")) for j in range(n)]
    shards = [shard_entries(entries, i, k) for i in range(k)]
    ids = [e.id for s in shards for e in s]
    assert sorted(ids) == sorted(e.id for e in entries)  # all, none twice
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    # the split depends on the ids, not on the order the inputs were listed in
    rng = np.random.default_rng(n * 31 + k)
    shuffled = [entries[j] for j in rng.permutation(n)]
    assert [shard_entries(shuffled, i, k) for i in range(k)] == shards
    # the same split as run_batch(shard=(i, k)) makes
    for i in range(k):
        assert shards[i] == sorted(entries, key=lambda e: e.id)[i::k]


def test_shard_entries_of_plain_paths_and_bad_shards() -> None:
    paths = ["b.svs", "a.svs", "c.svs"]
    assert shard_entries(paths, 0, 2) == ["a.svs", "c.svs"]
    assert shard_entries(paths, 1, 2) == ["b.svs"]
    for i, k in [(2, 2), (-1, 2), (0, 0)]:
        with pytest.raises(ConfigError, match="bad shard"):
            shard_entries(paths, i, k)


def test_parse_shard() -> None:
    assert parse_shard("0/4") == (0, 4)
    assert parse_shard(" 3/4 ") == (3, 4)
    for bad in ("4/4", "1", "a/b", "-1/3", "1/0", "1/2/3"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)


# -- merge ---------------------------------------------------------------------------------------
def _write_shard(out: Path, i: int, k: int, ids: list[str], *, manifest: bool = True,
                 config_hash: str = "h1", status: str = "ok", columns=COLUMNS,
                 run_hash: str = "r1") -> None:
    pred, man = shard_paths(out, i, k)
    out.mkdir(parents=True, exist_ok=True)
    with open(pred, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        for sid in ids:
            w.writerow({c: "" for c in columns} | {"id": sid, "path": f"/s/{sid}.svs",
                                                    "status": status, "probability": "0.25"})
    if manifest:
        man.write_text(json.dumps({
            "config": {"k": 1}, "config_hash": config_hash, "run_hash": run_hash,
            "versions": {"wsi_prune": "0.1.0"},
            "models": {"vit": "x"} if ids else None, "started": f"2026-01-0{i + 1}T00:00:00",
            "finished": f"2026-01-0{i + 2}T00:00:00",
            "slides": {sid: {"status": status} for sid in ids}, "shard": [i, k]}))


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_merge_all_shards(tmp_path: Path) -> None:
    _write_shard(tmp_path, 0, 3, ["a", "d"])
    _write_shard(tmp_path, 1, 3, ["b", "e"], status="failed")
    _write_shard(tmp_path, 2, 3, ["c"])
    res = merge_outputs(tmp_path)
    rows = _read_csv(tmp_path / "predictions.csv")
    assert [r["id"] for r in rows] == ["a", "b", "c", "d", "e"]
    assert list(rows[0]) == COLUMNS
    assert (res.shards, res.merged, res.missing, res.rows) == (3, (0, 1, 2), (), 5)
    assert res.statuses == {"ok": 3, "failed": 2}
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert list(man["slides"]) == ["a", "b", "c", "d", "e"]
    assert man["slides"]["b"]["status"] == "failed"
    assert man["config_hash"] == "h1" and man["run_hash"] == "r1"
    assert man["started"] == "2026-01-01T00:00:00" and man["finished"] == "2026-01-04T00:00:00"
    assert man["shards"] == {"k": 3, "merged": [0, 1, 2], "missing": [],
                             "versions_differ": False}
    # shard files are kept, and merging again gives the same bytes
    first = (tmp_path / "predictions.csv").read_bytes()
    merge_outputs(tmp_path)
    assert (tmp_path / "predictions.csv").read_bytes() == first
    assert shard_paths(tmp_path, 1, 3)[0].is_file()


def test_merge_missing_shards_lists_them(tmp_path: Path) -> None:
    _write_shard(tmp_path, 0, 4, ["a"])
    _write_shard(tmp_path, 2, 4, ["c"], manifest=False)  # still running, or killed
    with pytest.raises(ShardsMissing) as err:
        merge_outputs(tmp_path)
    msg = str(err.value)
    assert "3 of 4 shards" in msg and "1, 2 (manifest.shard-2-of-4.json missing" in msg
    assert msg.rstrip(")").endswith("or merge with --partial") and ", 3 " in msg
    assert not (tmp_path / "predictions.csv").exists()

    res = merge_outputs(tmp_path, partial=True)
    assert (res.merged, res.missing) == ((0,), (1, 2, 3))
    assert [r["id"] for r in _read_csv(res.predictions)] == ["a"]
    assert json.loads(res.manifest.read_text())["shards"]["missing"] == [1, 2, 3]

    # an explicit K that no file has
    with pytest.raises(ShardsMissing, match="none of the 2 shards"):
        merge_outputs(tmp_path, shards=2, partial=True)


def test_merge_refuses_inconsistent_shards(tmp_path: Path) -> None:
    with pytest.raises(ShardsMissing, match="nothing to merge"):
        merge_outputs(tmp_path)
    _write_shard(tmp_path / "two_k", 0, 1, ["a"])
    _write_shard(tmp_path / "two_k", 0, 2, ["a"])
    with pytest.raises(OutputConflict, match="several runs"):
        merge_outputs(tmp_path / "two_k")
    assert merge_outputs(tmp_path / "two_k", shards=1).rows == 1

    _write_shard(tmp_path / "dup", 0, 2, ["a", "b"])
    _write_shard(tmp_path / "dup", 1, 2, ["b"])
    with pytest.raises(OutputConflict, match="'b' is in both predictions.shard-0-of-2.csv"):
        merge_outputs(tmp_path / "dup")

    _write_shard(tmp_path / "cfg", 0, 2, ["a"])
    _write_shard(tmp_path / "cfg", 1, 2, ["b"], config_hash="h2")
    with pytest.raises(OutputConflict, match="different configs"):
        merge_outputs(tmp_path / "cfg")

    _write_shard(tmp_path / "weights", 0, 2, ["a"])
    _write_shard(tmp_path / "weights", 1, 2, ["b"], run_hash="r2")
    with pytest.raises(OutputConflict, match="different weights"):
        merge_outputs(tmp_path / "weights")

    _write_shard(tmp_path / "cols", 0, 2, ["a"])
    _write_shard(tmp_path / "cols", 1, 2, ["b"], columns=COLUMNS[:-1])
    with pytest.raises(OutputConflict, match="columns differ"):
        merge_outputs(tmp_path / "cols")


def test_merge_command(tmp_path: Path) -> None:
    _write_shard(tmp_path, 0, 2, ["a"])
    runner = CliRunner()
    res = runner.invoke(merge, [str(tmp_path)])
    assert res.exit_code == 1
    assert "1 of 2 shards have no results yet: 1" in res.output
    res = runner.invoke(merge, [str(tmp_path), "--partial"])
    assert res.exit_code == 0, res.output
    assert "1 slides (1 ok) from 1 of 2 shards" in res.output
    assert "missing shards: 1" in res.output
    _write_shard(tmp_path, 1, 2, ["b"])
    res = runner.invoke(merge, [str(tmp_path)])
    assert res.exit_code == 0 and "2 slides (2 ok) from 2 of 2 shards" in res.output
    assert runner.invoke(merge, ["--help"]).output.count("wsi-prune merge") == 2


# -- sbatch scripts ------------------------------------------------------------------------------
def test_sbatch_script_array_options_and_command(tmp_path: Path) -> None:
    cfg = tmp_path / "demo.yaml"
    cfg.write_text("{}\n")
    opts = SlurmOptions(queue="gpu", account="path-lab", cores=8, memory="32GB",
                        walltime="1-04:00:00", gpus=2, max_jobs=3,
                        setup=("module load cuda",))
    text = sbatch_script([tmp_path / "slides", "list.csv"], tmp_path / "out", 5, opts,
                         config_path=cfg, wsi_prune_cmd="/opt/venv/bin/wsi-prune",
                         run_args=["--device", "cuda"])
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    directives = [ln for ln in lines if ln.startswith("#SBATCH")]
    assert directives == [
        "#SBATCH --array=0-4%3",
        "#SBATCH --job-name=wsi-prune",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=30518M",  # 32e9 bytes in MiB, rounded up
        "#SBATCH --time=1-04:00:00",
        f"#SBATCH --output={tmp_path}/out/logs/%A_%a.out",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=path-lab",
        "#SBATCH --gres=gpu:2",
    ]
    # sbatch reads directives only before the first command
    first_cmd = next(i for i, ln in enumerate(lines) if ln and not ln.startswith("#"))
    assert all(lines.index(d) < first_cmd for d in directives)
    assert lines[first_cmd] == "module load cuda"
    assert lines[-1] == (
        f"exec /opt/venv/bin/wsi-prune run {tmp_path}/slides {Path.cwd()}/list.csv "
        f"--out {tmp_path}/out --config {cfg} --device cuda "
        '--shard "${SLURM_ARRAY_TASK_ID}/5"')
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0

    plain = sbatch_script(["a.svs"], tmp_path / "o", 1)
    assert "#SBATCH --array=0-0\n" in plain
    assert "--partition" not in plain and "--account" not in plain and "--gres" not in plain
    assert "#SBATCH --mem=3815M" in plain and "#SBATCH --time=01:00:00" in plain
    with pytest.raises(ConfigError, match="--shards must be >= 1"):
        sbatch_script(["a.svs"], tmp_path, 0)


def test_merge_script_and_options_validation(tmp_path: Path) -> None:
    text = merge_script(tmp_path, SlurmOptions(queue="short", gpus=4), "wsi-prune", shards=3)
    assert "#SBATCH --job-name=wsi-prune-merge" in text
    assert "#SBATCH --partition=short" in text and "--gres" not in text
    assert text.splitlines()[-1] == f"exec wsi-prune merge {tmp_path} --shards 3"
    assert f"#SBATCH --output={tmp_path}/logs/merge_%j.out" in text
    for bad, match in [({"walltime": "90 minutes"}, "walltime"), ({"memory": "lots"}, "memory"),
                       ({"cores": 0}, "cores"), ({"max_jobs": 0}, "max_jobs"),
                       ({"job_name": "a b"}, "job name")]:
        with pytest.raises(ConfigError, match=match):
            SlurmOptions(**bad)


def test_submit_slurm_dry_run_command(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    out = tmp_path / "out"
    res = CliRunner().invoke(submit, ["slurm", str(slides), "--out", str(out), "--shards", "3",
                                      "--dry-run", "--queue", "debug", "--mpp", "0.25"])
    assert res.exit_code == 0, res.output
    assert (out / "logs").is_dir()
    array = (out / "submit.sbatch").read_text()
    assert "#SBATCH --array=0-2" in array and "#SBATCH --partition=debug" in array
    assert f'--out {out} --mpp 0.25 --shard "${{SLURM_ARRAY_TASK_ID}}/3"' in array
    assert array in res.output and (out / "merge.sbatch").read_text() in res.output
    assert "afterany" in res.output
    assert "Examples:" in CliRunner().invoke(submit, ["slurm", "--help"]).output


def test_submit_slurm_with_gpus_runs_the_models_on_the_gpu(tmp_path: Path) -> None:
    """--gpus asks SLURM for a GPU; the task's `wsi-prune run` must also be told to use it
    (before, its models ran on the CPU of a GPU node)."""
    slides = tmp_path / "slides"
    slides.mkdir()

    def task_line(*args: str) -> tuple[int, str, str]:
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        res = CliRunner().invoke(submit, ["slurm", str(slides), "--out", str(out), "--shards",
                                          "2", "--dry-run", *args])
        script = (out / "submit.sbatch").read_text() if res.exit_code == 0 else ""
        return res.exit_code, script.splitlines()[-1] if script else "", res.output

    rc, line, _ = task_line("--gpus", "1")
    assert rc == 0 and line.endswith('--device cuda --shard "${SLURM_ARRAY_TASK_ID}/2"'), line
    rc, line, _ = task_line()
    assert rc == 0 and "--device" not in line
    rc, line, _ = task_line("--gpus", "1", "--device", "cpu")
    assert rc == 0 and "--device" not in line
    rc, line, _ = task_line("--device", "cuda:0")
    assert rc == 2  # a CUDA device without a GPU from SLURM
    rc, line, output = task_line("--gpus", "2")
    assert rc == 0 and "--device cuda" in line
    assert "--gpus 2 leaves 1 idle per task" in output
    rc, line, _ = task_line("--gpus", "1", "--read-workers", "6")
    assert rc == 0 and line.endswith('--device cuda --read-workers 6 --shard '
                                     '"${SLURM_ARRAY_TASK_ID}/2"'), line
    rc, line, _ = task_line("--read-workers", "0")
    assert rc == 2


# -- Dask clients --------------------------------------------------------------------------------
def test_make_client_default_is_one_process_and_bad_combinations() -> None:
    with make_client() as client:
        assert client is None
    with make_client(workers=0) as client:
        assert client is None
    for kwargs, match in [({"workers": 2, "scheduler": "tcp://h:1"}, "--scheduler"),
                          ({"cluster": "slurm", "workers": 2}, "--max-jobs"),
                          ({"cluster": "k8s"}, "local or slurm"),
                          ({"workers": -1}, ">= 0"),
                          ({"workers": 2, "memory_limit": "1GB"}, "--memory-limit 1GB"),
                          ({"workers": 2, "memory_limit": "lots"}, "not a memory size"),
                          # "auto" is the machine's memory shared out: too little for 4096
                          ({"workers": 4096, "memory_limit": "auto"}, "per Dask worker"),
                          ({"cluster": "slurm", "slurm": SlurmOptions(memory="1GB")},
                           "--memory 1GB"),
                          ({"scheduler": "no-such-file.json"}, "neither")]:
        with pytest.raises(ConfigError, match=match):
            with make_client(**kwargs):
                pass


def _pid_and_cached(i: int) -> tuple[int, int, dict]:
    return os.getpid(), worker_cache.cached("pid", os.getpid), worker_cache.cache_info()


def test_local_cluster_two_processes_and_per_worker_cache(caplog) -> None:
    caplog.set_level(logging.INFO, logger="wsi_prune.distributed.clients")
    with make_client(workers=2, memory_limit="2GB", dashboard_address=":0") as client:
        pids = set(client.run(os.getpid).values())
        assert len(pids) == 2 and os.getpid() not in pids
        # the heavy imports happened when the workers started, before any task
        preloaded = client.run(lambda: all(m in sys.modules for m in
                                           ("torch", "timm", "wsi_prune.pipeline.batch")))
        assert set(preloaded.values()) == {True}
        limits = {w["memory_limit"] for w in client.scheduler_info()["workers"].values()}
        assert limits == {2 * 10**9}
        results = client.gather(client.map(_pid_and_cached, range(16), pure=False))
        infos = client.run(worker_cache.cache_info)
    assert "LocalCluster: 2 worker processes, dashboard http" in caplog.text
    for pid, cached_pid, _ in results:
        assert cached_pid == pid  # the value built in this very worker process
    # each worker built its entry once, however many tasks it ran
    assert {info["pid"] for info in infos.values()} == pids
    for info in infos.values():
        assert info["loads"] == 1 and info["keys"] == ["pid"]
    assert sum(info["hits"] for info in infos.values()) == 16 - 2


def test_existing_scheduler_by_address_and_scheduler_file(tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as lc, Client(lc) as owner:
        sfile = tmp_path / "scheduler.json"
        owner.write_scheduler_file(str(sfile))
        for target in (lc.scheduler_address, str(sfile)):
            with make_client(scheduler=target) as client:
                assert client.scheduler.address == lc.scheduler_address
                assert client.submit(sum, [1, 2, 3]).result() == 6
        # the cluster outlives our client: we never close what we did not start
        assert owner.submit(sum, [4]).result() == 4
        closed = lc.scheduler_address
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(WsiPruneError, match="cannot reach the Dask scheduler") as err:
            with make_client(scheduler=closed):
                pass
    assert err.value.path == closed


def test_cached_builds_once_and_evicts_least_recent() -> None:
    worker_cache.clear_cache()
    calls: list[str] = []

    def factory(name: str):
        return lambda: calls.append(name) or {"model": name}

    a = worker_cache.cached("a", factory("a"))
    assert worker_cache.cached("a", factory("a")) is a and calls == ["a"]
    worker_cache.cached("b", factory("b"))
    worker_cache.cached("a", factory("a"))  # a is now the most recent
    worker_cache.cached("c", factory("c"))  # evicts b (CACHE_SIZE = 2)
    assert worker_cache.cache_info()["keys"] == ["a", "c"]
    worker_cache.cached("b", factory("b"))
    assert calls == ["a", "b", "c", "b"]
    assert worker_cache.cache_info()["loads"] == 4 and worker_cache.cache_info()["hits"] == 2
    worker_cache.clear_cache()


def test_get_models_loads_once_per_process() -> None:
    from wsi_prune.config import RunConfig

    worker_cache.clear_cache()
    cfg = RunConfig.from_yaml(REPO / "pipelines" / "demo.yaml")
    cfg_json = json.dumps(cfg.to_dict(), sort_keys=True)
    m1 = worker_cache.get_models(cfg_json)
    m2 = worker_cache.get_models(cfg_json)
    assert m1 is m2 and worker_cache.cache_info()["loads"] == 1
    assert m1.grid == (14, 14)
    other = json.dumps(cfg.replace(mil={"hidden": 32}).to_dict(), sort_keys=True)
    assert worker_cache.get_models(other) is not m1
    assert worker_cache.cache_info()["loads"] == 2
    # weights retrained at the same path: a new run hash, a fresh load
    assert worker_cache.get_models(cfg_json, run_hash="digest-after-retraining") is not m1
    assert worker_cache.cache_info()["loads"] == 3
    worker_cache.clear_cache()


def test_cluster_options_give_request_and_shard() -> None:
    import click

    seen = {}

    @click.command()
    @cluster_options
    def cmd(cluster_request: ClusterRequest, shard) -> None:
        seen.update(request=cluster_request, shard=shard)

    runner = CliRunner()
    res = runner.invoke(cmd, ["--workers", "2", "--memory-limit", "2GB", "--shard", "1/4"])
    assert res.exit_code == 0, res.output
    assert seen["shard"] == (1, 4)
    req = seen["request"]
    assert (req.workers, req.memory_limit, req.cluster, req.scheduler) == (2, "2GB", None, None)
    res = runner.invoke(cmd, ["--cluster", "slurm", "--queue", "q", "--gpus", "1",
                              "--max-jobs", "6", "--walltime", "00:30:00", "--interface", "ib0"])
    assert res.exit_code == 0, res.output
    req = seen["request"]
    assert req.slurm == SlurmOptions(queue="q", gpus=1, max_jobs=6, walltime="00:30:00")
    assert (req.cluster, req.interface, seen["shard"]) == ("slurm", "ib0", None)
    res = runner.invoke(cmd, ["--shard", "4/4"])
    assert res.exit_code == 2 and "need 0 <= i < K" in res.output
    res = runner.invoke(cmd, ["--walltime", "soon"])
    assert res.exit_code == 2 and "walltime" in res.output


def test_gpu_worker_jobs_get_the_gpu_and_a_remote_driver_needs_none(svs_slide: Path,
                                                                    tmp_path: Path) -> None:
    """`run --cluster slurm --gpus G` runs the models with --device cuda (before, the worker
    jobs got a GPU and ran on their CPUs). The driver of a remote cluster (here a scheduler
    reached by its address) does not look for a GPU of its own: each worker checks its own,
    and one without fails its slides saying so. With a LocalCluster of this machine the
    driver checks, before any slide."""
    import torch
    from distributed import Client, LocalCluster

    from wsi_prune.cli.run import default_device
    from wsi_prune.pipeline.batch import run_batch
    from wsi_prune.pipeline.demo import demo_config

    assert default_device(ClusterRequest(cluster="slurm", slurm=SlurmOptions(gpus=1))) == "cuda"
    assert default_device(ClusterRequest(cluster="slurm")) == "cpu"
    assert default_device(ClusterRequest(workers=2)) == "cpu"
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: its workers would use it")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as lc:
        with Client(lc.scheduler_address) as remote:
            rows = run_batch([svs_slide], tmp_path / "remote", demo_config(), device="cuda",
                             client=remote, progress=False)
        with Client(lc) as local, pytest.raises(ConfigError, match="CUDA is not available"):
            run_batch([svs_slide], tmp_path / "local", demo_config(), device="cuda",
                      client=local, progress=False)
    assert rows[0]["status"] == "failed", rows
    assert "CUDA is not available" in rows[0]["error"], rows[0]["error"]


# -- a worker killed mid-run ---------------------------------------------------------------------
def _store_arrays(path: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(path), mode="r")
    names = ("tiles/coarse", "tiles/coords", "tiles/grid", "tiles/tissue_fraction",
             "mask/tissue")
    return {n: np.asarray(g[n][...]) for n in names}


def test_worker_sigkill_mid_run_gives_identical_store(svs_slide: Path, tmp_path: Path) -> None:
    """Tiling writes one Zarr shard per Dask task; SIGKILL one of two worker processes after
    the first block finishes: the nanny restarts it, the scheduler recomputes its tasks, and
    the store equals an undisturbed single-process build byte for byte."""
    from wsi_prune.config import RunConfig
    from wsi_prune.io.tiling import tile_slide

    cfg = RunConfig().replace(tiling={"tiles_per_shard": 2})
    ref = tile_slide(svs_slide, tmp_path / "ref.zarr", cfg, scheduler="sync")
    n_blocks = -(-ref.n_tiles // 2)
    assert n_blocks >= 20

    killed: dict[str, int] = {}
    with make_client(workers=2, dashboard_address=":0") as client:
        pids = sorted(client.run(os.getpid).values())

        def kill_first_time(done: int, total: int) -> None:
            if not killed:
                os.kill(pids[0], signal.SIGKILL)
                killed.update(pid=pids[0], done=done, total=total)

        res = tile_slide(svs_slide, tmp_path / "run.zarr", cfg, scheduler=client,
                         progress=kill_first_time)
        after = set(client.run(os.getpid).values())
    assert killed["done"] < killed["total"]  # really mid-run
    assert killed["pid"] not in after  # that process is gone; the nanny started a new one
    assert res.n_tiles == ref.n_tiles
    got, want = _store_arrays(tmp_path / "run.zarr"), _store_arrays(tmp_path / "ref.zarr")
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def _run_outputs(out: Path, ids: list[str]) -> dict[str, np.ndarray]:
    names = ("tiles/coarse", "tiles/coords", "triage/tile_score", "triage/kept",
             "vit/embedding", "vit/kept_tokens", "mil/attention", "heatmap/tile")
    got = {}
    for sid in ids:
        g = zarr.open_group(str(out / f"{sid}.zarr"), mode="r")
        got |= {f"{sid}:{n}": np.asarray(g[n][...]) for n in names}
        got[f"{sid}:probability"] = np.asarray(g.attrs["result"]["probability"])
    return got


def test_run_batch_on_two_workers_with_one_sigkilled_equals_one_process(tmp_path: Path) -> None:
    """`run --workers 2`: one task per slide, each slide's tile blocks tasks of their own on
    both workers; once the first slide is done, SIGKILL the worker running another slide
    (found by the pid in its lock file): the scheduler reruns its tasks, the stale lock is
    taken over, and every output equals a run in one process."""
    import threading

    from distributed import get_task_stream

    from wsi_prune.config import RunConfig
    from wsi_prune.pipeline.batch import run_batch
    from wsi_prune.synth import write_dataset

    slides = write_dataset(tmp_path / "slides", n=3, size=2048, seed=5)
    ids = sorted(s.path.stem for s in slides)
    cfg = RunConfig.from_yaml(REPO / "pipelines" / "demo.yaml").replace(
        tiling={"tiles_per_shard": 4})
    ref = run_batch([tmp_path / "slides"], tmp_path / "ref", cfg, progress=False)
    assert [r["status"] for r in ref] == ["ok"] * 3

    out = tmp_path / "run"
    killed: dict[str, int] = {}
    stop = threading.Event()

    def kill_a_slide_worker() -> None:
        # after the first slide is recorded (its blocks have run on both workers), kill the
        # worker running another slide
        while not stop.is_set() and not (out / "predictions.csv").is_file():
            time.sleep(0.005)
        while not stop.is_set():
            for lock in out.glob("*.lock"):
                try:
                    pid = json.loads(lock.read_text())["pid"]
                except (OSError, ValueError, KeyError):
                    continue
                if pid in pids:
                    os.kill(pid, signal.SIGKILL)
                    killed.update(pid=pid, lock=lock.name)
                    return
            time.sleep(0.005)

    with make_client(workers=2, dashboard_address=":0") as client:
        pids = set(client.run(os.getpid).values())
        killer = threading.Thread(target=kill_a_slide_worker, daemon=True)
        killer.start()
        with get_task_stream(client) as ts:
            rows = run_batch([tmp_path / "slides"], out, cfg, client=client, progress=False)
        stop.set()
        killer.join()
        after = set(client.run(os.getpid).values())
    assert killed and killed["pid"] not in after, killed  # a worker really died mid-run
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert [r["id"] for r in rows] == ids
    # tile blocks ran as tasks of their own, spread over the workers (two, or three when the
    # worker the nanny started in place of the killed one ran blocks too)
    blocks = [t for t in ts.data if str(t["key"]).startswith("tile-block-")]
    assert len({t["worker"] for t in blocks}) >= 2
    assert not list(out.glob("*.lock")) and not list(out.glob(".*.zarr*"))
    got, want = _run_outputs(out, ids), _run_outputs(tmp_path / "ref", ids)
    assert got.keys() == want.keys()
    for name in want:
        if want[name].dtype.kind == "f":
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6,
                                       err_msg=name)
        else:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


class _DieAfterFirstSlide:
    """A Dask worker plugin: the first worker to finish a slide task SIGKILLs itself before it
    can report the result (a marker file makes it happen once across restarted workers)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def setup(self, worker) -> None:  # noqa: ANN001 - distributed's hook
        pass

    def teardown(self, worker) -> None:  # noqa: ANN001
        pass

    def transition(self, key, start, finish, **kwargs) -> None:  # noqa: ANN001
        if finish == "memory" and str(key).startswith("slide-"):
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.write(fd, str(key).encode())
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)


def test_slide_rerun_after_its_worker_died_with_the_result_is_reported_ok(
        tmp_path: Path) -> None:
    """A worker finishes a slide (outputs written) and dies before the result reaches the
    client: the scheduler reruns the task, which finds the outputs complete. The slide was
    computed by this run, so its row says ``ok``, not ``skipped`` (the flake this caused in
    the SIGKILL test above, made deterministic)."""
    from distributed import WorkerPlugin

    from wsi_prune.config import RunConfig
    from wsi_prune.pipeline.batch import run_batch
    from wsi_prune.synth import write_dataset

    write_dataset(tmp_path / "slides", n=2, size=1024, seed=7)
    cfg = RunConfig.from_yaml(REPO / "pipelines" / "demo.yaml")
    marker = tmp_path / "died"
    plugin = type("DieAfterFirstSlide", (_DieAfterFirstSlide, WorkerPlugin), {})(str(marker))
    with make_client(workers=2, dashboard_address=":0") as client:
        client.register_plugin(plugin)
        rows = run_batch([tmp_path / "slides"], tmp_path / "run", cfg, client=client,
                         progress=False)
    assert marker.read_text().startswith("slide-")  # a worker really died holding a result
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    # a second run finds both complete: those are the skipped ones
    again = run_batch([tmp_path / "slides"], tmp_path / "run", cfg, progress=False)
    assert [r["status"] for r in again] == ["skipped", "skipped"]


# -- a real SLURM --------------------------------------------------------------------------------
def _sinfo_ok() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture(scope="session")
def slurm() -> str:
    """A responding SLURM; started with scripts/start-slurm.sh when there is none. Returns
    the partition to use."""
    if not _sinfo_ok():
        if os.geteuid() != 0:
            pytest.skip("no SLURM here, and scripts/start-slurm.sh needs root to start one")
        try:
            proc = subprocess.run(["bash", str(REPO / "scripts" / "start-slurm.sh")],
                                  capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            pytest.skip("scripts/start-slurm.sh did not finish in 300 s")
        if proc.returncode != 0 or not _sinfo_ok():
            reason = (proc.stderr or proc.stdout).strip().splitlines()
            pytest.skip(f"cannot start SLURM: {reason[0] if reason else proc.returncode}")
    part = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True)
    return part.stdout.split()[0].rstrip("*")


def _wait_for_jobs(job_ids: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        q = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids)], capture_output=True,
                           text=True)
        if q.returncode == 0 and not q.stdout.strip():
            return
        time.sleep(1)
    subprocess.run(["scancel", *job_ids], check=False)
    pytest.fail(f"SLURM jobs {job_ids} still queued after {timeout_s:.0f} s")


def _job_states(job_id: str) -> list[str]:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True,
                         text=True).stdout
    return [w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")]


@pytest.mark.slurm
def test_sbatch_array_of_wsi_prune_run_then_merge_job(slurm: str, tmp_path: Path) -> None:
    """`wsi-prune submit slurm` on 3 synthetic slides in 3 shards: each array task runs
    `wsi-prune run --shard i/3` on a real SLURM; the dependent merge job writes
    predictions.csv and manifest.json."""
    from wsi_prune.synth import write_dataset

    slides = write_dataset(tmp_path / "slides", n=3, size=2048, seed=7)
    out = tmp_path / "out"
    cmd = str(Path(sys.executable).with_name("wsi-prune"))
    res = subprocess.run(
        [cmd, "submit", "slurm", str(tmp_path / "slides"), "--out", str(out), "--shards", "3",
         "--config", str(REPO / "pipelines" / "demo.yaml"), "--queue", slurm,
         "--memory", "1500MB", "--walltime", "00:15:00"],
        capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    line = res.stdout.splitlines()[0]  # "array job A (3 shards), merge job M"
    array_id, merge_id = line.split()[2], line.split()[-1]
    _wait_for_jobs([array_id, merge_id], timeout_s=600)

    logs = sorted(p.name for p in (out / "logs").iterdir())
    assert logs == sorted([f"{array_id}_{i}.out" for i in range(3)] + [f"merge_{merge_id}.out"])
    assert set(_job_states(array_id)) == {"COMPLETED"}, _job_states(array_id)
    assert _job_states(merge_id) == ["COMPLETED"], (out / "logs" / f"merge_{merge_id}.out"
                                                    ).read_text()[-2000:]
    # each shard wrote its own files, and the shards' slides are disjoint
    shard_ids = []
    for i in range(3):
        pred, man = shard_paths(out, i, 3)
        shard_ids.append([r["id"] for r in _read_csv(pred)])
        assert json.loads(man.read_text())["shard"] == [i, 3]
    expected = sorted(s.path.stem for s in slides)
    assert sorted(sum(shard_ids, [])) == expected and all(len(s) == 1 for s in shard_ids)
    # no file in OUT is written by two tasks: besides the scripts (submit) and the merged
    # files (merge job), every top-level file must name its shard, and every folder its slide
    once = {"submit.sbatch", "merge.sbatch", "predictions.csv", "manifest.json"}
    for p in out.iterdir():
        if p.is_file() and p.name not in once:
            assert re.search(r"\.shard-[0-2]-of-3\.", p.name), f"every shard writes {p.name}"
        elif p.name == "froc":  # CAMELYON16 export: one file per slide, each by its shard
            assert sorted(f.name for f in p.iterdir()) == [f"{s}.csv" for s in expected]
        elif p.is_dir():
            assert p.name == "logs" or p.name.removesuffix(".zarr") in expected, p.name
    rows = _read_csv(out / "predictions.csv")
    assert [r["id"] for r in rows] == expected
    assert {r["status"] for r in rows} == {"ok"}
    assert all(0.0 <= float(r["probability"]) <= 1.0 and int(r["tissue_tiles"]) > 0
               for r in rows)
    for sid in expected:
        assert (out / sid / "heatmap.png").is_file()
        assert zarr.open_group(str(out / f"{sid}.zarr"), mode="r").attrs["run_hash"]
    man = json.loads((out / "manifest.json").read_text())
    assert sorted(man["slides"]) == expected
    assert man["shards"]["k"] == 3 and man["shards"]["missing"] == []


@pytest.mark.slurm
def test_slurm_cluster_runs_dask_tasks_in_slurm_jobs(slurm: str, tmp_path: Path) -> None:
    """`--cluster slurm`: dask-jobqueue submits worker jobs adaptively (from 0) and the
    tasks run inside them; closing the cluster leaves no job behind."""
    def where(x: int) -> tuple[int, str | None, bool]:
        # nested, so cloudpickle ships it by value: worker jobs cannot import this test module
        return x * x, os.environ.get("SLURM_JOB_ID"), "wsi_prune.pipeline.batch" in sys.modules

    opts = SlurmOptions(queue=slurm, cores=1, memory="2GB", walltime="00:10:00", max_jobs=2,
                        job_name="wsi-prune-test", log_directory=str(tmp_path))
    with make_client(cluster="slurm", slurm=opts, interface="lo",
                     dashboard_address=":0") as client:
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        results = client.gather(client.map(where, range(12)))
        job_ids = {job for _, job, _ in results}
    assert [r for r, _, _ in results] == [x * x for x in range(12)]
    assert None not in job_ids and 1 <= len(job_ids) <= 2
    assert all(pre for _, _, pre in results)  # worker jobs preload wsi_prune
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        q = subprocess.run(["squeue", "-h", "-n", "wsi-prune-test"], capture_output=True,
                           text=True).stdout
        if not q.strip():
            break
        time.sleep(1)
    assert not q.strip(), f"worker jobs left after close: {q}"


def test_start_slurm_script_refuses_without_root() -> None:
    script = (REPO / "scripts" / "start-slurm.sh").read_text()
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs root to run the script as another user")
    # the script on stdin: user nobody may not be able to read the repo's folder
    proc = subprocess.run(["runuser", "-u", "nobody", "--", "bash", "-s"], input=script,
                          capture_output=True, text=True, timeout=30, cwd="/")
    assert proc.returncode == 1
    assert "cannot start SLURM: needs root" in proc.stderr


@pytest.mark.slurm
def test_start_slurm_script_is_idempotent(slurm: str) -> None:
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(REPO / "scripts" / "start-slurm.sh")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"SLURM ready: partition {slurm}" in proc.stdout
    assert "starting" not in proc.stdout  # nothing was (re)started
    assert time.monotonic() - t0 < 30
