"""Models stay in each worker process: a small per-process cache, so that Dask tasks carry a
run's config (a few KB) and never its weights, and a worker builds a run's models once.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


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
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        run_hash: :meth:`~wsi_prune.config.RunConfig.run_hash` (config plus weight-file
            digests), so that weights retrained at the same path are loaded afresh by a
            long-lived worker; None: the config alone identifies the models.
        digests: the weight files' SHA-256 as the batch computed them
            (:meth:`~wsi_prune.config.RunConfig.weight_digests`), so that a worker does not
            hash a large checkpoint again; None: hashed here when the models load.

    The cache key is the SHA-256 of ``device``, ``config_json`` and ``run_hash``.
    """
    from wsi_prune.config import RunConfig  # here: the cache itself needs no torch
    from wsi_prune.models.factory import build_models

    ident = f"{device}\0{config_json}\0{run_hash or ''}"
    key = "models:" + hashlib.sha256(ident.encode()).hexdigest()
    return cached(key, lambda: build_models(RunConfig.from_dict(json.loads(config_json)), device,
                                           digests))
