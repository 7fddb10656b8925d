"""Dask clients on existing engines: a LocalCluster, a running Dask scheduler, or a
dask-jobqueue ``SLURMCluster``.

Nothing here schedules work itself. :func:`make_client` chooses the Dask cluster; the batch
driver (:func:`wsi_prune.pipeline.batch.run_batch`) submits slides to it. SLURM arrays without
a Dask scheduler: :mod:`wsi_prune.distributed.slurm`; shards and their merge:
:mod:`wsi_prune.distributed.shards`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from wsi_prune.distributed.gpus import visible_gpus, worker_envs
from wsi_prune.distributed.slurm import SlurmOptions
from wsi_prune.errors import ConfigError, WsiPruneError

_logger = logging.getLogger(__name__)

ClusterKind = Literal["local", "slurm"]





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

    def client(self, dashboard_address: str = ":8787", device: str = "cpu"
               ) -> contextlib.AbstractContextManager:
        """:func:`make_client` for this request; ``device`` plain ``cuda`` pins LocalCluster
        workers to this node's GPUs, one each (:mod:`wsi_prune.distributed.gpus`)."""
        gpus = None
        if not self.scheduler and (self.cluster == "local" or self.workers):
            gpus = visible_gpus(device) or None
        return make_client(self.workers, self.scheduler, self.cluster, self.memory_limit,
                           self.slurm, self.interface, dashboard_address, gpus=gpus)


#: Module every worker we start imports first (:mod:`wsi_prune.distributed.preload`).
PRELOAD = "wsi_prune.distributed.preload"
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
    gpus: Sequence[str] | None = None,
) -> Iterator[Any]:
    """A ``distributed.Client`` for the requested cluster, closed (with the cluster) on exit.

    - ``scheduler`` given: connect to that running scheduler (address or scheduler file);
    - ``cluster="slurm"``: a dask-jobqueue ``SLURMCluster`` scaled adaptively between 0 and
      ``slurm.max_jobs`` single-process worker jobs;
    - ``cluster="local"`` or ``workers`` >= 1: a ``LocalCluster`` of ``workers`` processes
      with one thread each (default: one per CPU core, or one per GPU with ``gpus``) and
      ``memory_limit`` each; with ``gpus`` (``CUDA_VISIBLE_DEVICES`` entries, from
      :func:`~wsi_prune.distributed.gpus.visible_gpus`) worker ``i`` sees only GPU
      ``gpus[i % len(gpus)]``;
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
        n = workers or (len(gpus) if gpus else os.cpu_count() or 1)
        if memory_limit not in (None, 0, "0"):
            _check_worker_memory(memory_limit, "--memory-limit", n)
        with _local_cluster(n, memory_limit, interface, dashboard_address, gpus) as client:
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
                   dashboard_address: str, gpus: Sequence[str] | None = None) -> Iterator[Any]:
    from distributed import Client, LocalCluster

    # Processes, not threads: OpenSlide decoding and torch each want their own core and the
    # GIL would serialise the Python parts of a slide.
    with LocalCluster(n_workers=0 if gpus else n, threads_per_worker=1, processes=True,
                      memory_limit=memory_limit if memory_limit is not None else "auto",
                      interface=interface, dashboard_address=dashboard_address,
                      preload=[PRELOAD]) as lc:
        if gpus:
            # LocalCluster gives every worker one environment; GPU pinning needs one each,
            # set before the worker process starts (CUDA reads it once, at initialisation).
            for i, env in enumerate(worker_envs(gpus, n)):
                spec = dict(lc.new_spec)
                options = dict(spec["options"])
                options["env"] = {**(options.get("env") or {}), **env}
                lc.worker_spec[i] = {**spec, "options": options}
            lc.scale(n)
        with Client(lc) as client:
            if gpus:
                client.wait_for_workers(n)
            _logger.info("Dask LocalCluster: %d worker processes%s, dashboard %s", n,
                         f" on GPUs {', '.join(gpus)} (one each, round-robin)" if gpus else "",
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







