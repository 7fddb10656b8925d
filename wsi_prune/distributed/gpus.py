"""One Dask worker per GPU on a multi-GPU node.

With ``--device cuda`` (no index) and a LocalCluster, :func:`visible_gpus` lists the GPUs this
process may use and :func:`~wsi_prune.distributed.clients.make_client` starts one worker
process per GPU (or ``--workers`` of them, assigned round-robin), each with
``CUDA_VISIBLE_DEVICES`` set to its own GPU before the process starts. Inside a worker, torch
then sees exactly one GPU, so ``cuda`` is that GPU, no worker creates a CUDA context on
another worker's GPU (every process touching ``cuda:0`` would otherwise hold ~0.5 GB there),
and a slide's models, tiles and autocast all stay on it. This is what dask-cuda's
``LocalCUDACluster`` does, without needing dask-cuda. :func:`worker_device` is the device
string a slide task uses in its worker.

An explicit ``cuda:N`` is the user's choice of one GPU for every worker: nothing is pinned.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

#: set in each pinned worker's environment: the GPU (as the parent saw it) it was given
GPU_ENV = "WSI_PRUNE_GPU"
_CUDA_ENV = "CUDA_VISIBLE_DEVICES"


def visible_gpus(device: str, count: int | None = None) -> list[str]:
    """The GPUs to pin LocalCluster workers to for ``device``, as ``CUDA_VISIBLE_DEVICES``
    entries; empty when nothing is to be pinned.

    Args:
        device: the run's device. Only plain ``cuda`` pins; ``cpu``, ``mps`` and ``cuda:N``
            give ``[]``.
        count: the number of CUDA devices (default: ``torch.cuda.device_count()``, which asks
            the driver without creating a CUDA context in this process).

    Returns:
        This process's own ``CUDA_VISIBLE_DEVICES`` entries (a SLURM allocation's ``2,5``, or
        GPU UUIDs) when it is set, else ``0 .. count-1``; at most ``count`` of them.
    """
    if device.strip().lower() != "cuda":
        return []
    if count is None:
        import torch

        count = torch.cuda.device_count()
    if count <= 0:
        return []
    env = os.environ.get(_CUDA_ENV)
    if env is not None and env.strip():
        ids = [e.strip() for e in env.split(",") if e.strip()]
        return ids[:count]
    return [str(i) for i in range(count)]


def worker_envs(gpus: Sequence[str], n_workers: int) -> list[dict[str, str]]:
    """The environment of each of ``n_workers`` workers: worker ``i`` gets GPU
    ``gpus[i % len(gpus)]`` (more workers than GPUs share them round-robin).

    Raises:
        ValueError: no GPUs or no workers.
    """
    if not gpus or n_workers < 1:
        raise ValueError(f"need GPUs and workers, got {list(gpus)} and {n_workers}")
    return [{_CUDA_ENV: gpus[i % len(gpus)], GPU_ENV: gpus[i % len(gpus)]}
            for i in range(n_workers)]


def worker_device(device: str) -> str:
    """The device string a slide task uses in this process.

    In a worker pinned by :func:`worker_envs`, ``cuda`` becomes ``cuda:0``: its one visible GPU
    (the parent's ``WSI_PRUNE_GPU``). Everything else is returned unchanged.
    """
    if device.strip().lower() == "cuda" and os.environ.get(GPU_ENV) is not None:
        return "cuda:0"
    return device


def worker_gpu() -> str | None:
    """The GPU this worker was pinned to (as the parent saw it), or None."""
    return os.environ.get(GPU_ENV)
