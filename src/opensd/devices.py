"""Which device a run uses, from the words a user types: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``.

>>> resolve_device("auto")     # CUDA when present, else MPS when present, else the CPU
device(type='cpu')

A device that does not exist here is a :class:`DeviceError` naming what does, never an
assertion deep inside torch.
"""

from __future__ import annotations

import re

import torch

from opensd.errors import OpenSDError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


class DeviceError(OpenSDError):
    """The device asked for is not a device name, or not present on this machine."""


def available_devices() -> list[str]:
    """The devices present here, as a user would name them."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


def resolve_device(spec: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """The :class:`torch.device` for ``spec``; ``None`` or ``"auto"`` picks CUDA (``cuda:<local_rank>``), then MPS, then the CPU."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if "mps" in available_devices():
            return torch.device("mps")
        return torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", text)
    if m:
        if not torch.cuda.is_available():
            raise DeviceError(f"device {spec!r}: CUDA is not available on this machine; available: {', '.join(available_devices())}")
        index = local_rank if m.group(1) is None else int(m.group(1))
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s); available: {', '.join(available_devices())}")
        return torch.device("cuda", index)
    if text == "mps":
        if "mps" not in available_devices():
            raise DeviceError(f"device {spec!r}: MPS is not available on this machine; available: {', '.join(available_devices())}")
        return torch.device("mps")
    raise DeviceError(f"unknown device {spec!r}; use {DEVICE_CHOICES}")
