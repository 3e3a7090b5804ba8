"""Which device to run on: the accelerator when there is one, a clear error for one that is not there, and how
much memory it has left."""

from __future__ import annotations

import torch


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(name: str | torch.device) -> torch.device:
    """`name` as a device of this machine; a ValueError naming what is missing otherwise."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"unknown device {name!r}: {error}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count or not count:
            raise ValueError(f"device {name!r} is not there: this machine has {count} CUDA device(s)")
    elif device.type != "cpu" and not torch.accelerator.is_available():
        raise ValueError(f"device {name!r} is not there: this machine has no {device.type} accelerator")
    return device


def available_memory_bytes(device: str | torch.device) -> int:
    """Free memory on `device`: an accelerator's, or on a CPU the kernel's MemAvailable (what a new process can
    still take)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) * 1024
