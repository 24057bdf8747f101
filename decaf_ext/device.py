"""Devices by name: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` checked without torch, resolved with it.

Example::

    >>> resolve_device("auto")          # cuda when available, else cpu
    device(type='cpu')
"""

from __future__ import annotations

import re

from decaf_ext.errors import ConfigError


def check_device(device: str) -> None:
    """ConfigError (one line) unless `device` is cpu, cuda, cuda:N or auto."""
    if device != "auto" and not re.fullmatch(r"(cpu|cuda)(:\d+)?", device):
        raise ConfigError(f"device must be cpu, cuda, cuda:N or auto, got {device!r}")


def resolve_device(name: str, local_rank: int | None = None):
    """The torch.device `name` (checked by :func:`check_device`) stands for: auto -> cuda if available, else cpu;
    with `local_rank` (one process per agent) a bare auto/cuda becomes cuda:LOCAL_RANK. ConfigError for CUDA
    without CUDA."""
    import torch

    check_device(name)
    if name == "auto":
        name = "cuda" if cuda_available() else "cpu"
    if name == "cuda" and local_rank is not None:
        name = f"cuda:{local_rank}"
    if name.startswith("cuda") and not cuda_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
