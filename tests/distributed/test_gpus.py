"""One Dask worker per GPU, checked on the CPU: a real LocalCluster whose worker processes are
pinned with CUDA_VISIBLE_DEVICES, and the device string each of them hands a slide task. No
GPU is needed (nothing touches CUDA); on a GPU node the same environment makes each worker see
only its own GPU."""

from __future__ import annotations

import os

import pytest

from wsi_prune.distributed.clients import ClusterRequest, make_client
from wsi_prune.distributed.gpus import GPU_ENV, visible_gpus, worker_device, worker_envs


def test_visible_gpus(monkeypatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_gpus("cuda", count=4) == ["0", "1", "2", "3"]
    assert visible_gpus(" CUDA ", count=2) == ["0", "1"]
    # an explicit GPU, another device or no GPU: nothing to pin
    for device, count in (("cuda:1", 4), ("cpu", 4), ("mps", 1), ("cuda", 0)):
        assert visible_gpus(device, count=count) == []
    # a SLURM allocation's (or the user's) mask is kept: workers get those GPUs, in order
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert visible_gpus("cuda", count=2) == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aa11,GPU-bb22,GPU-cc33")
    assert visible_gpus("cuda", count=2) == ["GPU-aa11", "GPU-bb22"]


def test_worker_envs_round_robin() -> None:
    envs = worker_envs(["3", "5"], 3)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["3", "5", "3"]
    assert [e[GPU_ENV] for e in envs] == ["3", "5", "3"]
    with pytest.raises(ValueError):
        worker_envs([], 2)


def test_worker_device(monkeypatch) -> None:
    monkeypatch.delenv(GPU_ENV, raising=False)
    assert worker_device("cuda") == "cuda" and worker_device("cpu") == "cpu"
    monkeypatch.setenv(GPU_ENV, "5")
    assert worker_device("cuda") == "cuda:0"  # its one visible GPU
    assert worker_device("cuda:1") == "cuda:1" and worker_device("cpu") == "cpu"


def _worker_view() -> tuple[str | None, str | None, str, int]:
    return (os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get(GPU_ENV),
            worker_device("cuda"), os.getpid())


def test_one_pinned_worker_per_gpu_on_a_local_cluster() -> None:
    """make_client with two GPUs and no --workers: two worker processes, one per GPU, each
    started with its own CUDA_VISIBLE_DEVICES; in each, a slide task's cuda is cuda:0."""
    with make_client(cluster="local", memory_limit="2GB", dashboard_address=":0",
                     gpus=["3", "5"]) as client:
        views = client.run(_worker_view)
    assert len(views) == 2 and len({v[3] for v in views.values()}) == 2
    assert sorted(v[:3] for v in views.values()) == [("3", "3", "cuda:0"), ("5", "5", "cuda:0")]
    assert os.environ.get(GPU_ENV) is None  # the parent is not pinned


def test_cluster_request_pins_only_for_plain_cuda(monkeypatch) -> None:
    """ClusterRequest.client asks visible_gpus with the run's device; cpu (and a running
    scheduler) pins nothing."""
    from wsi_prune.distributed import clients

    seen = []
    monkeypatch.setattr(clients, "make_client", lambda *a, **kw: seen.append(kw["gpus"]))
    monkeypatch.setattr(clients, "visible_gpus", lambda device: ["0", "1"] if device == "cuda"
                        else [])
    ClusterRequest(workers=2).client(device="cuda")
    ClusterRequest(workers=2).client(device="cpu")
    ClusterRequest(scheduler="tcp://h:1").client(device="cuda")
    ClusterRequest().client(device="cuda")  # one process: no cluster, nothing to pin
    assert seen == [["0", "1"], None, None, None]
