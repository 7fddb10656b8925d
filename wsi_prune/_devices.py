"""Device names: ``cpu``, ``cuda``, ``cuda:N`` and ``mps``, checked in one place.

:func:`parse_device` checks the spelling only (no torch import: the CLI parses options before
any heavy import); :func:`check_device` asks torch whether the device exists here, so a run on
a machine without it stops at once with one clear error instead of failing every slide.
"""

from __future__ import annotations

import re

from wsi_prune.errors import ConfigError

_DEVICE = re.compile(r"^(cpu|mps|cuda(:(0|[1-9][0-9]*))?)$")
#: the forms accepted, for help texts
DEVICE_FORMS = "cpu, cuda, cuda:N (N = GPU index) or mps"


def parse_device(name: str) -> str:
    """The canonical device name (lower case, stripped).

    Raises:
        ConfigError: not one of :data:`DEVICE_FORMS`.
    """
    dev = str(name).strip().lower()
    if not _DEVICE.match(dev):
        raise ConfigError(f"device {name!r} is not one of: {DEVICE_FORMS}")
    return dev


def check_device(name: str) -> str:
    """:func:`parse_device`, then check that torch can use the device on this machine.

    Raises:
        ConfigError: the device is misspelt or absent (no CUDA, fewer GPUs than the index,
            no MPS), naming what is there.
    """
    import torch

    dev = parse_device(name)
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {dev!r}: CUDA is not available here (torch "
                              f"{torch.__version__}, built for CUDA {torch.version.cuda})")
        index = int(dev.split(":")[1]) if ":" in dev else 0
        count = torch.cuda.device_count()
        if index >= count:
            raise ConfigError(f"device {dev!r}: this machine has {count} CUDA device(s) "
                              f"(cuda:0-cuda:{count - 1})")
    elif dev == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError("device 'mps': Apple MPS is not available here")
    return dev
