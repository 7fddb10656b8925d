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


def normalise_tiles(tiles: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
                    ) -> torch.Tensor:
    """ViT input from uint8 RGB tiles, on their device: ``(x / 255 - mean) / std``.

    Computed as one copy to contiguous float32 channels-first and one in-place multiply-add,
    a third of the time of the formula's four passes (equal to it up to float rounding,
    ~1e-7). Inference (:meth:`~wsi_prune.models.factory.Models.vit_input`) and training
    (:func:`wsi_prune.training._common.normalised`) both call it, so a model is trained on
    exactly the numbers it is run on.

    Args:
        tiles: (B, H, W, 3) uint8.
        mean, std: (1, 3, 1, 1) float on the tiles' device.

    Returns:
        (B, 3, H, W) float32, contiguous.
    """
    b, h, w, c = tiles.shape
    x = torch.empty((b, c, h, w), dtype=torch.float32, device=tiles.device)
    x.copy_(tiles.permute(0, 3, 1, 2))
    return x.mul_(1.0 / (255.0 * std)).add_(-mean / std)


def is_reduced(device: str | torch.device, precision: str) -> bool:
    """Whether ``precision`` actually runs below fp32 on ``device``."""
    return autocast_dtype(device, precision) is not None


def _fold(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d) -> None:
    """Fold ``bn``'s running statistics and affine into ``conv``'s weight and bias."""
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else \
            1.0 / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias if bn.affine else torch.zeros_like(scale)
        conv.weight.mul_(scale.reshape(-1, *([1] * (conv.weight.ndim - 1))))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        new_bias = (bias - bn.running_mean) * scale + shift
        conv.bias = torch.nn.Parameter(new_bias.to(conv.weight.dtype))


def _bn_replacement(bn: torch.nn.Module) -> torch.nn.Module | None:
    """What stays of a batch norm once folded: nothing for a plain one; the dropout and
    activation of timm's ``BatchNormAct2d``; None for any other kind (left alone)."""
    if type(bn) is torch.nn.BatchNorm2d:
        return torch.nn.Identity()
    if type(bn).__name__ == "BatchNormAct2d" and hasattr(bn, "act") and hasattr(bn, "drop"):
        return torch.nn.Sequential(bn.drop, bn.act)
    return None


def fuse_conv_bn(model: torch.nn.Module) -> int:
    """Fold every batch norm that directly follows a 2-D convolution among its parent's
    children into that convolution, in place (inference only: the result cannot be trained
    and its state dict has other keys). Returns the number folded.

    "Follows" is registration order, which is forward order in timm's CNN blocks but not in
    every module: use :func:`fused_for_inference`, which checks the outputs.
    """
    n = 0
    for parent in list(model.modules()):
        kids = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(kids, kids[1:], strict=False):
            if not (isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d)):
                continue
            if bn.running_var is None or bn.num_features != conv.out_channels:
                continue
            repl = _bn_replacement(bn)
            if repl is None:
                continue
            _fold(conv, bn)
            setattr(parent, bn_name, repl)
            n += 1
    return n


def fused_for_inference(model: torch.nn.Module, input_shape: tuple[int, ...],
                        atol: float = 1e-4) -> torch.nn.Module:
    """``model`` (in eval mode) with its convolutions' batch norms folded in
    (:func:`fuse_conv_bn`) when that leaves its outputs unchanged within ``atol`` (relative to
    their magnitude) on a seeded random batch of ``input_shape`` (B, C, H, W) uint8; else
    ``model`` itself. The triage CNN spends about a fifth of its CPU time in batch norms
    (mobilenetv3_small on 56 px tiles).
    """
    import copy

    model.eval()
    fused = copy.deepcopy(model).eval()
    if fuse_conv_bn(fused) == 0:
        return model
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, input_shape, generator=gen, dtype=torch.uint8).to(device)
    with torch.inference_mode():
        want, got = model(x), fused(x)
    pairs = list(zip(_tensors(want), _tensors(got), strict=True))
    if not pairs:
        return model
    for a, b in pairs:
        a, b = a.float(), b.float()
        if a.shape != b.shape or not torch.allclose(a, b, rtol=atol,
                                                    atol=atol * (1.0 + float(a.abs().max()))):
            _logger.debug("batch-norm folding changed the outputs; kept the model as it is")
            return model
    return fused


def _tensors(out: object) -> list[torch.Tensor]:
    """The tensors of a model's output (a tensor, a tuple or a dataclass of tensors)."""
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if hasattr(out, "__dataclass_fields__"):
        return [t for f in out.__dataclass_fields__ for t in _tensors(getattr(out, f))]
    return []
