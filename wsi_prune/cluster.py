"""Scale out on existing engines: a Dask LocalCluster, an existing Dask scheduler, a
dask-jobqueue ``SLURMCluster``, or SLURM array jobs over shards of the slide list.

Nothing here schedules work itself. :func:`make_client` chooses the Dask cluster; the batch
driver (:func:`wsi_prune.pipeline.batch.run_batch`) submits slides to it. For clusters where a
long-lived Dask scheduler is unwelcome, :func:`submit_slurm` writes an sbatch **array** (one
task per shard, each running ``wsi-prune run --shard i/K``) and a merge job that depends on it;
:func:`merge_outputs` combines the shards' ``predictions.shard-i-of-K.csv`` and manifests.

Each shard writes only its own files (``predictions.shard-i-of-K.csv``,
``manifest.shard-i-of-K.json``) and its own slides' ``OUT/<id>.zarr`` and ``OUT/<id>/``: a slide
belongs to exactly one shard, so no two array tasks ever write the same path.

Why a dependent merge job and not "the last task merges": array tasks finish in any order and a
task cannot tell whether it is the last one without a lock or counter on the shared file system;
``sbatch --dependency=afterany:<array job>`` is SLURM's own way to say "after all of them". It is
``afterany`` (not ``afterok``) because a shard whose slides partly failed exits non-zero yet
has written its rows; the merge itself refuses, listing them, if shards are missing.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from wsi_prune.errors import ConfigError, OutputConflict, ShardsMissing, WsiPruneError

_logger = logging.getLogger(__name__)

T = TypeVar("T")
ClusterKind = Literal["local", "slurm"]

_SHARD_RE = re.compile(r"^(predictions|manifest)\.shard-(\d+)-of-(\d+)\.(csv|json)$")
_WALLTIME_RE = re.compile(r"^(\d+-)?\d{1,3}:\d{2}(:\d{2})?$")


# -- options -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SlurmOptions:
    """Resources of one SLURM job (an array task, or one Dask worker job).

    Attributes:
        queue: partition (``--partition``); None: the cluster's default.
        account: ``--account``; None: the user's default.
        cores: CPU cores per job (``--cpus-per-task``).
        memory: memory per job, e.g. ``"8GB"`` (decimal units as in Dask; sbatch gets MiB).
        walltime: ``[D-]HH:MM[:SS]`` time limit per job.
        gpus: GPUs per job (``--gres=gpu:G``); 0: none.
        max_jobs: most jobs at once (adaptive maximum of a SLURMCluster; ``%J`` throttle of an
            array); None: no limit for arrays, 4 for a SLURMCluster.
        job_name: ``--job-name``.
        setup: shell lines run in every job before the command (``module load ...``,
            ``source venv/bin/activate``).
        log_directory: where job logs go; None: ``OUT/logs`` for arrays, the working folder
            for Dask worker jobs.
    """

    queue: str | None = None
    account: str | None = None
    cores: int = 1
    memory: str = "4GB"
    walltime: str = "01:00:00"
    gpus: int = 0
    max_jobs: int | None = None
    job_name: str = "wsi-prune"
    setup: tuple[str, ...] = ()
    log_directory: str | None = None

    def __post_init__(self) -> None:
        if self.cores < 1:
            raise ConfigError(f"SLURM cores must be >= 1, got {self.cores}")
        if self.gpus < 0:
            raise ConfigError(f"SLURM gpus must be >= 0, got {self.gpus}")
        if self.max_jobs is not None and self.max_jobs < 1:
            raise ConfigError(f"SLURM max_jobs must be >= 1, got {self.max_jobs}")
        if not _WALLTIME_RE.match(self.walltime):
            raise ConfigError(f"SLURM walltime {self.walltime!r} is not [D-]HH:MM[:SS]")
        memory_mib(self.memory)  # validates
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.job_name):
            raise ConfigError(f"SLURM job name {self.job_name!r}: letters, digits, . _ - only")


def memory_mib(memory: str) -> int:
    """``"4GB"`` -> 3815: a Dask memory string as whole MiB for ``sbatch --mem`` (rounded up)."""
    from dask.utils import parse_bytes

    try:
        n = parse_bytes(memory)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"memory {memory!r} is not a size such as 4GB or 512MiB") from exc
    if n <= 0:
        raise ConfigError(f"memory {memory!r} must be positive")
    return max(1, math.ceil(n / 2**20))


@dataclass(frozen=True)
class ClusterRequest:
    """What the user asked for on the command line; :meth:`client` builds it.

    Attributes:
        workers: LocalCluster worker processes (``None``/0 with no other option: one process).
        scheduler: ``tcp://host:port`` of a running scheduler, or a scheduler-file path.
        cluster: ``"local"`` or ``"slurm"``; None: local when ``workers`` is set.
        memory_limit: per LocalCluster worker (``"4GB"``, ``"auto"``, ``0`` = no limit).
        slurm: job resources for ``cluster="slurm"``.
        interface: network interface for scheduler and workers (``lo``, ``ib0``...).
    """

    workers: int | None = None
    scheduler: str | None = None
    cluster: ClusterKind | None = None
    memory_limit: str | None = "auto"
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    interface: str | None = None

    def client(self, dashboard_address: str = ":8787") -> contextlib.AbstractContextManager:
        return make_client(self.workers, self.scheduler, self.cluster, self.memory_limit,
                           self.slurm, self.interface, dashboard_address)


# -- Dask clients ------------------------------------------------------------------------------
#: Module every worker we start imports first (:mod:`wsi_prune._preload`).
PRELOAD = "wsi_prune._preload"
#: Smallest memory limit per Dask worker we accept, bytes (see :func:`_check_worker_memory`).
MIN_WORKER_MEMORY = 3 * 2**29  # 1.5 GiB


@contextlib.contextmanager
def make_client(
    workers: int | None = None,
    scheduler: str | None = None,
    cluster: ClusterKind | None = None,
    memory_limit: str | int | None = "auto",
    slurm: SlurmOptions | None = None,
    interface: str | None = None,
    dashboard_address: str = ":8787",
) -> Iterator[Any]:
    """A ``distributed.Client`` for the requested cluster, closed (with the cluster) on exit.

    - ``scheduler`` given: connect to that running scheduler (address or scheduler file);
    - ``cluster="slurm"``: a dask-jobqueue ``SLURMCluster`` scaled adaptively between 0 and
      ``slurm.max_jobs`` single-process worker jobs;
    - ``cluster="local"`` or ``workers`` >= 1: a ``LocalCluster`` of ``workers`` processes
      with one thread each (default: one per CPU core) and ``memory_limit`` each;
    - otherwise: yields None, meaning "stay in this process".

    The dashboard address is logged (INFO) whenever a cluster is started here.

    Raises:
        ConfigError: contradictory options, or a scheduler that is neither an address nor an
            existing scheduler file.
    """
    if workers is not None and workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {workers}")
    if cluster not in (None, "local", "slurm"):
        raise ConfigError(f"--cluster must be local or slurm, got {cluster!r}")
    if scheduler and (cluster or workers):
        raise ConfigError("--scheduler uses a running Dask cluster: drop --workers/--cluster")
    if cluster == "slurm" and workers:
        raise ConfigError("--cluster slurm scales adaptively: use --max-jobs, not --workers")
    if cluster == "slurm":
        _check_worker_memory((slurm or SlurmOptions()).memory, "--memory")

    if scheduler:
        with _connect(scheduler) as client:
            yield client
    elif cluster == "slurm":
        with _slurm_cluster(slurm or SlurmOptions(), interface, dashboard_address) as client:
            yield client
    elif cluster == "local" or workers:
        n = workers or os.cpu_count() or 1
        if memory_limit not in (None, 0, "0"):
            _check_worker_memory(memory_limit, "--memory-limit", n)
        with _local_cluster(n, memory_limit, interface, dashboard_address) as client:
            yield client
    else:
        yield None


def _check_worker_memory(memory: str | int | float, option: str, n_workers: int = 1) -> None:
    """Refuse a worker memory limit too small to run a slide.

    ``memory`` is what Dask accepts for one of ``n_workers`` workers: bytes, a size string
    (``4GB``), a fraction of this machine's memory (``0.5``) or ``auto`` (its share of it).
    A worker holds about 0.8 GB once torch, timm and OpenSlide are imported (the CUDA build of
    torch; measured with the preload), before models and tiles. Dask pauses a worker at 80 %
    of its limit and never resumes it if the baseline alone is above that, so a small limit
    would hang the run instead of failing it.

    Raises:
        ConfigError: not a memory size, or under :data:`MIN_WORKER_MEMORY`.
    """
    from dask.utils import format_bytes
    from distributed.worker_memory import parse_memory_limit

    try:
        n = parse_memory_limit(memory, 1, total_cores=n_workers, logger=_logger)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{option} {memory!r} is not a memory size such as 4GB, 0.5 or "
                          "auto") from exc
    if n is not None and n < MIN_WORKER_MEMORY:
        raise ConfigError(f"{option} {memory}: {format_bytes(n)} per Dask worker, under the "
                          f"{format_bytes(MIN_WORKER_MEMORY)} a worker needs (about 0.8 GB after "
                          "its imports, plus models and tiles); give 2GB or more, or fewer "
                          "workers")


@contextlib.contextmanager
def _connect(scheduler: str) -> Iterator[Any]:
    from distributed import Client

    path = Path(scheduler).expanduser()
    if not (path.is_file() or "://" in scheduler or re.fullmatch(r"[\w.-]+:\d+", scheduler)):
        raise ConfigError("--scheduler is neither tcp://HOST:PORT nor an existing scheduler file",
                          scheduler)
    try:
        client = Client(scheduler_file=str(path)) if path.is_file() else Client(scheduler)
    except OSError as exc:  # distributed raises OSError (or TimeoutError) when none answers
        raise WsiPruneError(f"cannot reach the Dask scheduler: {exc}", scheduler) from exc
    _logger.info("connected to Dask scheduler %s (%d workers, dashboard %s)",
                 client.scheduler.address, len(client.scheduler_info()["workers"]),
                 client.dashboard_link)
    try:
        yield client
    finally:
        client.close()


@contextlib.contextmanager
def _local_cluster(n: int, memory_limit: str | int | None, interface: str | None,
                   dashboard_address: str) -> Iterator[Any]:
    from distributed import Client, LocalCluster

    # Processes, not threads: OpenSlide decoding and torch each want their own core and the
    # GIL would serialise the Python parts of a slide.
    with LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                      memory_limit=memory_limit if memory_limit is not None else "auto",
                      interface=interface, dashboard_address=dashboard_address,
                      preload=[PRELOAD]) as lc:
        with Client(lc) as client:
            _logger.info("Dask LocalCluster: %d worker processes, dashboard %s", n,
                         client.dashboard_link)
            yield client


@contextlib.contextmanager
def _slurm_cluster(opts: SlurmOptions, interface: str | None, dashboard_address: str
                   ) -> Iterator[Any]:
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    extra = [f"--gres=gpu:{opts.gpus}"] if opts.gpus else []
    kwargs: dict[str, Any] = dict(
        cores=opts.cores, processes=1, memory=opts.memory, walltime=opts.walltime,
        queue=opts.queue, account=opts.account, job_name=opts.job_name,
        job_extra_directives=extra, job_script_prologue=list(opts.setup),
        interface=interface, python=sys.executable,
        scheduler_options={"dashboard_address": dashboard_address},
        worker_extra_args=["--preload", PRELOAD],
    )
    if opts.log_directory:
        kwargs["log_directory"] = opts.log_directory
    max_jobs = opts.max_jobs or 4
    with SLURMCluster(**kwargs) as sc:
        # Adaptive: jobs are requested while tasks wait and released when idle, so a batch of
        # 3 slides never holds 4 nodes and an idle run costs no allocation.
        sc.adapt(minimum_jobs=0, maximum_jobs=max_jobs)
        with Client(sc) as client:
            _logger.info("Dask SLURMCluster: up to %d jobs of %d core(s), %s; dashboard %s",
                         max_jobs, opts.cores, opts.memory, client.dashboard_link)
            _logger.debug("worker job script:\n%s", sc.job_script())
            yield client


# -- per-process cache (models on workers) -----------------------------------------------------
#: Entries kept per process. Models of one config are one entry; 2 leaves room for a run that
#: switches configs without holding every model ever loaded.
CACHE_SIZE = 2
_cache: collections.OrderedDict[str, Any] = collections.OrderedDict()
_cache_lock = threading.RLock()
_cache_stats = {"hits": 0, "loads": 0}


def cached(key: str, factory: Callable[[], T]) -> T:
    """The value for ``key`` in this process, built by ``factory()`` on first use.

    On Dask workers this keeps model weights in the worker process: tasks carry the config
    (a few KB), never the weights. The least recently used entry beyond :data:`CACHE_SIZE` is
    dropped. Thread-safe; ``factory`` runs at most once per key while the entry lives.
    """
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            _cache_stats["hits"] += 1
            return _cache[key]
        value = factory()
        _cache[key] = value
        _cache_stats["loads"] += 1
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
        return value


def cache_info() -> dict[str, Any]:
    """This process's cache: ``{"pid", "keys", "hits", "loads"}``."""
    with _cache_lock:
        return {"pid": os.getpid(), "keys": list(_cache), **_cache_stats}


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()
        _cache_stats.update(hits=0, loads=0)


def get_models(config_json: str, device: str = "cpu", run_hash: str | None = None,
               digests: dict[str, str | None] | None = None) -> Any:
    """The run's models (:class:`wsi_prune.models.factory.Models`), loaded once per process.

    Args:
        config_json: the run config as JSON (``json.dumps(config.to_dict())``).
        device: ``cpu`` or ``cuda``.
        run_hash: :meth:`~wsi_prune.config.RunConfig.run_hash` (config plus weight-file
            digests), so that weights retrained at the same path are loaded afresh by a
            long-lived worker; None: the config alone identifies the models.
        digests: the weight files' SHA-256 as the batch computed them
            (:meth:`~wsi_prune.config.RunConfig.weight_digests`), so that a worker does not
            hash a large checkpoint again; None: hashed here when the models load.

    The cache key is the SHA-256 of ``device``, ``config_json`` and ``run_hash``.
    """
    from wsi_prune.config import RunConfig
    from wsi_prune.models.factory import build_models

    ident = f"{device}\0{config_json}\0{run_hash or ''}"
    key = "models:" + hashlib.sha256(ident.encode()).hexdigest()
    return cached(key, lambda: build_models(RunConfig.from_dict(json.loads(config_json)), device,
                                           digests))


# -- shards ------------------------------------------------------------------------------------
def _entry_key(entry: Any) -> str:
    return str(getattr(entry, "id", entry))


def shard_entries(entries: Sequence[T], i: int, k: int) -> list[T]:
    """The ``i``-th of ``k`` shards (0-based) of a slide list.

    Entries are sorted by id (a :class:`~wsi_prune.pipeline.inputs.SlideEntry`'s ``id``, else
    ``str(entry)``) and dealt round-robin, so every shard of a list gets the same slides on any
    machine whatever order the inputs were listed in, and sizes differ by at most one.
    """
    check_shard(i, k)
    return sorted(entries, key=_entry_key)[i::k]


def check_shard(i: int, k: int) -> None:
    if not (isinstance(i, int) and isinstance(k, int) and k >= 1 and 0 <= i < k):
        raise ConfigError(f"bad shard {i}/{k}: need 0 <= i < K and K >= 1")


def shard_suffix(i: int, k: int) -> str:
    """``".shard-2-of-8"``: what a shard inserts before a run file's extension."""
    check_shard(i, k)
    return f".shard-{i}-of-{k}"


def shard_paths(out: str | os.PathLike[str], i: int, k: int) -> tuple[Path, Path]:
    """``(OUT/predictions.shard-i-of-K.csv, OUT/manifest.shard-i-of-K.json)``."""
    s = shard_suffix(i, k)
    return Path(out) / f"predictions{s}.csv", Path(out) / f"manifest{s}.json"


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge_outputs` wrote.

    Attributes:
        predictions / manifest: the merged files.
        shards: K.
        merged: shard indices whose results were merged.
        missing: shard indices without results (only non-empty with ``partial=True``).
        rows: slides in ``predictions.csv``; ``statuses`` counts them by status.
    """

    predictions: Path
    manifest: Path
    shards: int
    merged: tuple[int, ...]
    missing: tuple[int, ...]
    rows: int
    statuses: dict[str, int]


def find_shards(out: str | os.PathLike[str]) -> dict[int, dict[int, dict[str, Path]]]:
    """Shard files in ``out``: ``{K: {i: {"predictions": path, "manifest": path}}}``."""
    found: dict[int, dict[int, dict[str, Path]]] = {}
    for p in sorted(Path(out).iterdir()):
        m = _SHARD_RE.match(p.name)
        if m and p.is_file():
            kind, i, k = m.group(1), int(m.group(2)), int(m.group(3))
            found.setdefault(k, {}).setdefault(i, {})[kind] = p
    return found


def merge_outputs(out: str | os.PathLike[str], shards: int | None = None, partial: bool = False
                  ) -> MergeResult:
    """Combine ``predictions.shard-i-of-K.csv`` into ``predictions.csv`` and the shard
    manifests into ``manifest.json`` (both written atomically; shard files are kept).

    A shard counts as present when both its CSV and its manifest exist (a shard writes its
    manifest last). Rows are sorted by slide id, the order the shards were cut in.

    Args:
        out: the run's output folder.
        shards: K; None: taken from the file names (which must then agree on one K).
        partial: merge what is there and record the missing shards instead of failing.

    Raises:
        ShardsMissing: some of the K shards are missing (lists them), unless ``partial``.
        OutputConflict: files of several K, shards run with different configs, a slide in two
            shards, or shard CSVs with different columns.
    """
    out = Path(out)
    if not out.is_dir():
        raise ShardsMissing("output folder does not exist", out)
    found = find_shards(out)
    if shards is None:
        if not found:
            raise ShardsMissing("no predictions.shard-*-of-*.csv here: nothing to merge", out)
        if len(found) > 1:
            raise OutputConflict(
                f"shard files of several runs (K = {', '.join(map(str, sorted(found)))}); "
                "remove the stale ones or pass the shard count", out)
        shards = next(iter(found))
    files = found.get(shards, {})
    present = sorted(i for i, f in files.items() if len(f) == 2)
    missing = [i for i in range(shards) if i not in present]
    if missing and not partial:
        raise ShardsMissing(
            f"{len(missing)} of {shards} shards have no results yet: "
            + ", ".join(_describe_missing(i, shards, files.get(i, {})) for i in missing)
            + " (rerun them, or merge with --partial)", out)
    if not present:
        raise ShardsMissing(f"none of the {shards} shards has results", out)

    header, rows = _read_shard_rows(out, [files[i]["predictions"] for i in present])
    manifests = [json.loads(files[i]["manifest"].read_text(encoding="utf-8")) for i in present]
    hashes = {m.get("config_hash") for m in manifests}
    if len(hashes) > 1:
        raise OutputConflict(f"shards ran with different configs ({len(hashes)} config hashes)",
                             out)
    # same config, but weight files that changed between shards (retrained at the same path)
    run_hashes = {m.get("run_hash") for m in manifests}
    if len(run_hashes) > 1:
        raise OutputConflict(f"shards ran with different weights ({len(run_hashes)} run "
                             "hashes for one config)", out)
    rows.sort(key=lambda r: r["id"])

    pred_path, man_path = out / "predictions.csv", out / "manifest.json"
    from wsi_prune._files import (
        write_text_atomic,  # here: the CLI imports this module, zarr is slow
    )

    write_text_atomic(pred_path, _csv_text(header, rows))
    manifest = _merge_manifests(manifests, shards, present, missing)
    write_text_atomic(man_path, json.dumps(manifest, indent=2, default=str))
    statuses = dict(collections.Counter(r.get("status", "") for r in rows))
    _logger.info("merged %d of %d shards: %d slides %s -> %s", len(present), shards, len(rows),
                 statuses, pred_path)
    return MergeResult(pred_path, man_path, shards, tuple(present), tuple(missing), len(rows),
                       statuses)


def _describe_missing(i: int, k: int, have: dict[str, Path]) -> str:
    if "predictions" in have:
        return f"{i} (manifest.shard-{i}-of-{k}.json missing: still running or killed?)"
    return f"{i}"


def _read_shard_rows(out: Path, paths: list[Path]) -> tuple[list[str], list[dict[str, str]]]:
    header: list[str] | None = None
    rows: list[dict[str, str]] = []
    owner: dict[str, str] = {}
    for p in paths:
        with open(p, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            cols = list(reader.fieldnames or [])
            if "id" not in cols:
                raise OutputConflict("shard CSV has no 'id' column", p)
            if header is None:
                header = cols
            elif cols != header:
                raise OutputConflict(f"columns differ from {paths[0].name}", p)
            for row in reader:
                if row["id"] in owner:
                    raise OutputConflict(
                        f"slide {row['id']!r} is in both {owner[row['id']]} and {p.name}", out)
                owner[row["id"]] = p.name
                rows.append(row)
    return header or ["id"], rows


def _csv_text(header: list[str], rows: list[dict[str, str]]) -> str:
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _merge_manifests(manifests: list[dict[str, Any]], k: int, present: list[int],
                     missing: list[int]) -> dict[str, Any]:
    first = manifests[0]
    slides: dict[str, Any] = {}
    for m in manifests:
        slides.update(m.get("slides") or {})
    merged = {key: first.get(key)
              for key in ("config", "config_hash", "run_hash", "versions", "models")}
    # a shard whose slides were all skipped loaded no models; take the first that did
    merged["models"] = next((m["models"] for m in manifests if m.get("models")), None)
    starts = [m["started"] for m in manifests if m.get("started")]
    ends = [m["finished"] for m in manifests if m.get("finished")]
    merged.update(
        started=min(starts) if starts else None,
        finished=max(ends) if ends else None,
        slides=dict(sorted(slides.items())),
        shards={"k": k, "merged": present, "missing": missing,
                "versions_differ": len({json.dumps(m.get("versions"), sort_keys=True)
                                        for m in manifests}) > 1},
    )
    return merged


# -- SLURM arrays ------------------------------------------------------------------------------
def default_command() -> str:
    """The ``wsi-prune`` of this environment (the venv's console script when there is one),
    so jobs run the same installation as the submitting shell."""
    here = Path(sys.executable).with_name("wsi-prune")
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("wsi-prune") or "wsi-prune"


def _directives(opts: SlurmOptions, job_name: str, log: str, cores: int, mem_mib: int,
                walltime: str, gpus: int) -> list[str]:
    lines = [f"--job-name={job_name}", f"--cpus-per-task={cores}", f"--mem={mem_mib}M",
             f"--time={walltime}", f"--output={log}"]
    if opts.queue:
        lines.append(f"--partition={opts.queue}")
    if opts.account:
        lines.append(f"--account={opts.account}")
    if gpus:
        lines.append(f"--gres=gpu:{gpus}")
    return [f"#SBATCH {shlex.quote(line)}" for line in lines]


def _log_dir(out: Path, opts: SlurmOptions) -> Path:
    return Path(opts.log_directory).resolve() if opts.log_directory else out / "logs"


def sbatch_script(
    inputs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    shards: int,
    options: SlurmOptions | None = None,
    config_path: str | os.PathLike[str] | None = None,
    wsi_prune_cmd: str | None = None,
    run_args: Sequence[str] = (),
) -> str:
    """The bash sbatch **array** script: task ``i`` of ``0..K-1`` runs
    ``wsi-prune run INPUT... --out OUT --shard i/K [--config C] [RUN_ARGS...]``.

    Paths are made absolute (jobs may start in another folder). Logs go to
    ``OUT/logs/%A_%a.out`` (array job id, task index). ``options.max_jobs`` becomes the
    ``%J`` throttle of ``--array``.
    """
    opts = options or SlurmOptions()
    if shards < 1:
        raise ConfigError(f"--shards must be >= 1, got {shards}")
    if not inputs:
        raise ConfigError("no inputs to submit")
    out = Path(out).resolve()
    array = f"0-{shards - 1}" + (f"%{opts.max_jobs}" if opts.max_jobs else "")
    cmd = [wsi_prune_cmd or default_command(), "run",
           *(str(Path(p).resolve()) for p in inputs), "--out", str(out)]
    if config_path is not None:
        cmd += ["--config", str(Path(config_path).resolve())]
    cmd += list(run_args)
    log = str(_log_dir(out, opts) / "%A_%a.out")
    lines = ["#!/bin/bash",
             f"# wsi-prune: {shards} shard(s) of the slide list, one array task each.",
             f"# Merge afterwards: {shlex.quote(wsi_prune_cmd or default_command())} merge "
             f"{shlex.quote(str(out))}",
             f"#SBATCH --array={array}",
             *_directives(opts, opts.job_name, log, opts.cores, memory_mib(opts.memory),
                          opts.walltime, opts.gpus),
             *opts.setup,  # before `set -u`: module systems and activate scripts may trip it
             "set -euo pipefail",
             # one thread per allocated core: torch/BLAS otherwise start one per machine core
             'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"',
             f'echo "wsi-prune shard ${{SLURM_ARRAY_TASK_ID}}/{shards} on $(hostname)"',
             "exec " + " ".join(shlex.quote(c) for c in cmd)
             + f' --shard "${{SLURM_ARRAY_TASK_ID}}/{shards}"',
             ""]
    return "\n".join(lines)


def merge_script(out: str | os.PathLike[str], options: SlurmOptions | None = None,
                 wsi_prune_cmd: str | None = None, shards: int | None = None) -> str:
    """The sbatch script of the merge job (1 core, 1 GiB, 30 min): ``wsi-prune merge OUT``."""
    opts = options or SlurmOptions()
    out = Path(out).resolve()
    cmd = [wsi_prune_cmd or default_command(), "merge", str(out)]
    if shards is not None:
        cmd += ["--shards", str(shards)]
    log = str(_log_dir(out, opts) / "merge_%j.out")
    lines = ["#!/bin/bash",
             "# wsi-prune: merge the shards' predictions and manifests.",
             *_directives(opts, f"{opts.job_name}-merge", log, 1, 1024, "00:30:00", 0),
             *opts.setup,
             "set -euo pipefail",
             "exec " + " ".join(shlex.quote(c) for c in cmd),
             ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class Submission:
    """Scripts written by :func:`submit_slurm` and the job ids ``sbatch`` gave (empty when
    ``dry_run``)."""

    array_script: Path
    merge_script: Path
    job_ids: tuple[str, ...]


def submit_slurm(
    inputs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    shards: int,
    options: SlurmOptions | None = None,
    config_path: str | os.PathLike[str] | None = None,
    wsi_prune_cmd: str | None = None,
    run_args: Sequence[str] = (),
    dry_run: bool = False,
) -> Submission:
    """Write ``OUT/submit.sbatch`` (the array) and ``OUT/merge.sbatch``, then submit both:
    the array, and the merge with ``--dependency=afterany:<array id>``.

    Returns:
        The scripts and ``(array_job_id, merge_job_id)``; no ids with ``dry_run``.

    Raises:
        WsiPruneError: ``sbatch`` is missing or refused a script (its message included).
    """
    opts = options or SlurmOptions()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # SLURM does not create the --output folder: a missing one loses every log silently
    _log_dir(out, opts).mkdir(parents=True, exist_ok=True)
    array_path, merge_path = out / "submit.sbatch", out / "merge.sbatch"
    from wsi_prune._files import write_text_atomic

    write_text_atomic(array_path, sbatch_script(inputs, out, shards, opts, config_path,
                                            wsi_prune_cmd, run_args))
    write_text_atomic(merge_path, merge_script(out, opts, wsi_prune_cmd, shards))
    if dry_run:
        return Submission(array_path, merge_path, ())
    array_id = _sbatch([str(array_path)])
    merge_id = _sbatch([f"--dependency=afterany:{array_id}", str(merge_path)])
    _logger.info("submitted array job %s (%d shards) and merge job %s; logs in %s", array_id,
                 shards, merge_id, _log_dir(out, opts))
    return Submission(array_path, merge_path, (array_id, merge_id))


def _sbatch(args: list[str]) -> str:
    exe = shutil.which("sbatch")
    if exe is None:
        raise WsiPruneError("sbatch not found: is this a SLURM login node? (--dry-run writes the "
                            "scripts without submitting)")
    proc = subprocess.run([exe, "--parsable", *args], capture_output=True, text=True,
                          timeout=120, check=False)
    if proc.returncode != 0:
        msg = " ".join((proc.stderr or proc.stdout).split()) or f"exit {proc.returncode}"
        raise WsiPruneError(f"sbatch refused the job: {msg}", args[-1])
    # --parsable prints "jobid" or "jobid;cluster"
    return proc.stdout.strip().split(";")[0]
