"""Where the models' arithmetic runs: mixed-precision autocast and host→device copies.

* :func:`autocast` wraps a forward in ``torch.autocast`` for ``vit.precision`` /
  ``scorer.precision``. ``fp32`` is no autocast at all (the exact path the keep-all tests
  compare with timm). On CPU, ``bf16`` is honoured (torch's CPU autocast runs matmuls in bf16,
  fast on CPUs with AVX512-BF16/AMX) and ``fp16`` runs in fp32: CPU half matmuls are slow or
  missing, so asking for them there is a configuration written for a GPU, not a wish to be
  slow. Softmax, norms and the CLS-attention ranking stay in fp32 under autocast.
* :func:`to_device` copies uint8 tiles to the device through pinned (page-locked) memory with
  ``non_blocking=True`` on CUDA, so the copy is a DMA that does not hold the Python thread;
  on CPU it is the NumPy array's own memory, no copy. Tiles travel as uint8 (4x less than
  float) and are converted on the device.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import numpy as np
import torch

from wsi_prune.config import PRECISIONS
from wsi_prune.errors import ConfigError

_logger = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_warned: set[str] = set()


def autocast_dtype(device: str | torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``, or None for plain fp32.

    Args:
        device: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` (or a ``torch.device``).
        precision: ``fp32``, ``bf16`` or ``fp16``.

    Raises:
        ConfigError: an unknown precision.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be {'|'.join(PRECISIONS)}, got {precision!r}")
    kind = torch.device(device).type
    if precision == "fp32":
        return None
    if kind == "cpu" and precision == "fp16":
        if "cpu-fp16" not in _warned:
            _warned.add("cpu-fp16")
            _logger.warning("precision fp16 on CPU runs in fp32 (use bf16 for reduced "
                            "precision on CPU)")
        return None
    return _DTYPES[precision]


@contextlib.contextmanager
def autocast(device: str | torch.device, precision: str) -> Iterator[None]:
    """``torch.autocast`` for ``precision`` on ``device``'s type; nothing for fp32.

    Args:
        device: where the forward runs; precision: see :func:`autocast_dtype`.
    """
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
        yield


def to_device(array: np.ndarray, device: str | torch.device) -> torch.Tensor:
    """A NumPy array as a tensor on ``device``: pinned and non-blocking to CUDA, no copy on CPU.

    The pinned staging copy comes from torch's caching host allocator, which keeps it alive
    until the asynchronous copy has finished, so the caller may drop it at once.

    Args:
        array: any NumPy array (tiles: (B, H, W, 3) uint8).
        device: target device.

    Returns:
        The tensor on ``device`` (same dtype and shape).
    """
    t = torch.from_numpy(np.ascontiguousarray(array))
    dev = torch.device(device)
    if dev.type == "cpu":
        return t
    if dev.type == "cuda":
        return t.pin_memory().to(dev, non_blocking=True)
    return t.to(dev)


def is_reduced(device: str | torch.device, precision: str) -> bool:
    """Whether ``precision`` actually runs below fp32 on ``device``."""
    return autocast_dtype(device, precision) is not None
