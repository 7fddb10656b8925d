"""SLURM without a long-lived Dask scheduler: :func:`submit_slurm` writes an sbatch **array**
(one task per shard, each running ``wsi-prune run --shard i/K``) and a merge job that depends
on it, and submits both. :class:`SlurmOptions` also sizes the worker jobs of a dask-jobqueue
``SLURMCluster`` (:mod:`wsi_prune.distributed.clients`).

Why a dependent merge job and not "the last task merges": array tasks finish in any order and a
task cannot tell whether it is the last one without a lock or counter on the shared file system;
``sbatch --dependency=afterany:<array job>`` is SLURM's own way to say "after all of them". It is
``afterany`` (not ``afterok``) because a shard whose slides partly failed exits non-zero yet
has written its rows; the merge itself refuses, listing them, if shards are missing.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from wsi_prune._files import write_text_atomic
from wsi_prune.errors import ConfigError, WsiPruneError

_logger = logging.getLogger(__name__)

_WALLTIME_RE = re.compile(r"^(\d+-)?\d{1,3}:\d{2}(:\d{2})?$")


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
