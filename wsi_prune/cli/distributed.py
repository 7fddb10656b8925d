"""Click pieces for scaling out, registered by :mod:`wsi_prune.cli`:

- :func:`cluster_options`: ``--workers/--scheduler/--cluster/...`` and ``--shard i/K`` for
  ``wsi-prune run``;
- ``submit`` (a group) with ``submit slurm``: an sbatch array over shards of the slide list;
- ``merge``: combine the shards' predictions and manifests.

Thin on purpose: options are parsed here, the work is in :mod:`wsi_prune.distributed.clients`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from wsi_prune.cli.common import DEVICE, device_for_gpus, handle_errors
from wsi_prune.distributed.clients import ClusterRequest
from wsi_prune.distributed.shards import merge_outputs
from wsi_prune.distributed.slurm import SlurmOptions, submit_slurm
from wsi_prune.errors import ConfigError

_CTX = {"help_option_names": ["-h", "--help"]}


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/8"`` -> ``(2, 8)``: shard i (0-based) of K.

    Raises:
        ConfigError: not ``i/K`` with ``0 <= i < K``.
    """
    parts = str(text).strip().split("/")
    try:
        i, k = (int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected i/K, e.g. 0/4") from None
    if not (k >= 1 and 0 <= i < k):
        raise ConfigError(f"--shard {text!r}: need 0 <= i < K (i is 0-based)")
    return i, k


def _shard_callback(ctx: click.Context, param: click.Parameter, value: str | None
                    ) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        return parse_shard(value)
    except ConfigError as exc:
        raise click.BadParameter(exc.reason) from None


def _slurm_options(array: bool) -> list[Callable[..., Any]]:
    jobs_help = ("Most array tasks running at once (sbatch %J throttle)." if array else
                 "Most SLURM worker jobs at once (adaptive maximum; default 4).")
    return [
        click.option("--queue", default=None, help="SLURM partition."),
        click.option("--account", default=None, help="SLURM account."),
        click.option("--cores", type=click.IntRange(min=1), default=1, show_default=True,
                     help="CPU cores per SLURM job."),
        click.option("--memory", default="4GB", show_default=True,
                     help="Memory per SLURM job (e.g. 8GB)."),
        click.option("--walltime", default="01:00:00", show_default=True,
                     help="Time limit per SLURM job, [D-]HH:MM:SS."),
        click.option("--gpus", type=click.IntRange(min=0), default=0, show_default=True,
                     help="GPUs per SLURM job (--gres=gpu:G)."),
        click.option("--max-jobs", type=click.IntRange(min=1), default=None, help=jobs_help),
    ]


def _apply(options: list[Callable[..., Any]]) -> Callable[..., Any]:
    """One decorator applying ``options`` so that --help lists them in this order."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        for opt in reversed(options):
            fn = opt(fn)
        return fn

    return deco


_CLUSTER_KEYS = ("workers", "scheduler", "cluster", "memory_limit", "queue", "account", "cores",
                 "memory", "walltime", "gpus", "max_jobs", "interface")


def cluster_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add the scale-out options to a command (``wsi-prune run``).

    The command then receives ``cluster_request`` (a
    :class:`~wsi_prune.distributed.clients.ClusterRequest`; ``with cluster_request.client() as
    client:`` gives a ``distributed.Client`` or None) and ``shard`` (``(i, K)`` or None) instead of
    the separate option values.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        v = {k: kwargs.pop(k) for k in _CLUSTER_KEYS}
        try:
            slurm = SlurmOptions(queue=v["queue"], account=v["account"], cores=v["cores"],
                                 memory=v["memory"], walltime=v["walltime"], gpus=v["gpus"],
                                 max_jobs=v["max_jobs"])
        except ConfigError as exc:
            raise click.UsageError(exc.reason) from None
        kwargs["cluster_request"] = ClusterRequest(
            workers=v["workers"], scheduler=v["scheduler"], cluster=v["cluster"],
            memory_limit=v["memory_limit"], slurm=slurm, interface=v["interface"])
        return fn(*args, **kwargs)

    return _apply([
        click.option("--workers", type=click.IntRange(min=0), default=None,
                     help="Dask LocalCluster of N worker processes (1 thread each). "
                          "Without --workers/--scheduler/--cluster: one process."),
        click.option("--scheduler", default=None, metavar="ADDRESS|FILE",
                     help="Use a running Dask cluster: tcp://HOST:8786 or a scheduler file."),
        click.option("--cluster", type=click.Choice(["local", "slurm"]), default=None,
                     help="local: LocalCluster (one worker per core unless --workers); "
                          "slurm: dask-jobqueue SLURMCluster, scaled adaptively."),
        click.option("--memory-limit", default="auto", show_default=True,
                     help="Memory limit per LocalCluster worker (e.g. 4GB; 0: none)."),
        *_slurm_options(array=False),
        click.option("--interface", default=None,
                     help="Network interface for Dask scheduler and workers (e.g. ib0, lo)."),
        click.option("--shard", default=None, metavar="i/K", callback=_shard_callback,
                     help="Only the i-th (0-based) of K shards of the sorted slide list; "
                          "writes predictions.shard-i-of-K.csv."),
    ])(wrapper)


@click.group(context_settings=_CTX)
def submit() -> None:
    """Submit a batch to a cluster scheduler as independent jobs.

    \b
    Example:
      wsi-prune submit slurm slides/ --out results/ --shards 16 --queue gpu --gpus 1
    """


@submit.command("slurm", context_settings=_CTX)
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output folder on a file system every node sees.")
@click.option("--shards", type=click.IntRange(min=1), required=True,
              help="K: array tasks, each running `wsi-prune run --shard i/K`.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              default=None, help="Pipeline YAML (see pipelines/).")
@click.option("--mpp", type=float, default=None,
              help="µm/px for slides whose metadata has none (passed to every task).")
@_apply(_slurm_options(array=True))
@click.option("--device", type=DEVICE, default=None,
              help="Where each task's models run: cpu, cuda, cuda:N or mps (passed to "
                   "`wsi-prune run`). [default: cuda with --gpus, else cpu]")
@click.option("--read-workers", type=click.IntRange(min=1), default=None,
              help="Threads reading each slide's kept tiles (passed to `wsi-prune run`). "
                   "[default: run's: a quarter of the task's cores, 1-4, with a GPU; else 1]")
@click.option("--job-name", default="wsi-prune", show_default=True, help="SLURM job name.")
@click.option("--setup", "setup", multiple=True, metavar="LINE",
              help="Shell line run in every job first, e.g. 'module load cuda' (repeatable).")
@click.option("--dry-run", is_flag=True, help="Write and print the scripts; submit nothing.")
@handle_errors
def submit_slurm_cmd(inputs: tuple[str, ...], out: str, shards: int, config_path: str | None,
                     mpp: float | None, queue: str | None, account: str | None, cores: int,
                     memory: str, walltime: str, gpus: int, max_jobs: int | None,
                     device: str | None, read_workers: int | None, job_name: str,
                     setup: tuple[str, ...], dry_run: bool) -> None:
    """Run INPUT... as a SLURM array of K shards, then merge them.

    Writes OUT/submit.sbatch (array task i runs `wsi-prune run INPUT... --out OUT --shard i/K`)
    and OUT/merge.sbatch (`wsi-prune merge OUT`, submitted with --dependency=afterany on the
    array), submits both with sbatch and prints the job ids. Each shard writes only its own
    slides and OUT/predictions.shard-i-of-K.csv; logs go to OUT/logs/.

    \b
    Examples:
      wsi-prune submit slurm slides/ --out /scratch/run1 --shards 8 --dry-run
      wsi-prune submit slurm slides.csv --out /scratch/run1 --shards 32 --max-jobs 8 \\
          --queue gpu --gpus 1 --cores 8 --memory 32GB --walltime 04:00:00 \\
          --config pipelines/camelyon16.yaml --setup 'source ~/venvs/wsi/bin/activate'
    """
    opts = SlurmOptions(queue=queue, account=account, cores=cores, memory=memory,
                        walltime=walltime, gpus=gpus, max_jobs=max_jobs, job_name=job_name,
                        setup=tuple(setup))
    run_args = ["--mpp", str(mpp)] if mpp is not None else []
    device = device or device_for_gpus(gpus)
    if device.startswith("cuda") and not gpus:
        raise click.UsageError(f"--device {device} needs --gpus 1: without it the job gets "
                               "no GPU")
    if device != "cpu":
        run_args += ["--device", device]
    if read_workers is not None:
        run_args += ["--read-workers", str(read_workers)]
    if gpus > 1:
        click.echo(f"warning: each array task is one process on one GPU, so --gpus {gpus} "
                   f"leaves {gpus - 1} idle per task; use --gpus 1 and more --shards", err=True)
    sub = submit_slurm(list(inputs), out, shards, opts, config_path, run_args=run_args,
                       dry_run=dry_run)
    if dry_run:
        click.echo(f"# {sub.array_script}")
        click.echo(sub.array_script.read_text(encoding="utf-8"))
        click.echo(f"# {sub.merge_script} (submitted with --dependency=afterany:<array id>)")
        click.echo(sub.merge_script.read_text(encoding="utf-8"))
        return
    array_id, merge_id = sub.job_ids
    click.echo(f"array job {array_id} ({shards} shards), merge job {merge_id}")
    click.echo(f"watch: squeue -j {array_id},{merge_id}   results: {sub.array_script.parent}")


@click.command(context_settings=_CTX)
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.option("--shards", type=click.IntRange(min=1), default=None,
              help="K (default: from the shard file names).")
@click.option("--partial", is_flag=True,
              help="Merge the shards present and record the missing ones in manifest.json.")
@handle_errors
def merge(out: str, shards: int | None, partial: bool) -> None:
    """Merge OUT/predictions.shard-i-of-K.csv into OUT/predictions.csv, and the shard
    manifests into OUT/manifest.json. Fails, listing them, if shards are missing.

    \b
    Examples:
      wsi-prune merge /scratch/run1
      wsi-prune merge /scratch/run1 --partial
    """
    res = merge_outputs(out, shards=shards, partial=partial)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(res.statuses.items())) or "no slides"
    click.echo(f"{res.predictions}: {res.rows} slides ({counts}) from {len(res.merged)} of "
               f"{res.shards} shards")
    if res.missing:
        click.echo(f"missing shards: {', '.join(map(str, res.missing))}", err=True)
