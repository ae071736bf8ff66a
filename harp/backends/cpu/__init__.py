"""The `cpu` backend: host memory as device memory, every test's and every CPU-only developer's device."""
from __future__ import annotations

import os
import platform
from typing import Any

from .. import Backend
from ...device import Device
from ...tenancy import Tenancy
from ...types import DeviceInfo
from ...units import parse_size
from ..aten import torch_available
from .card import CpuCard
from .device import CpuDevice

DEFAULT_MEMORY = 4 << 30


def _numba_available() -> bool:
    try:
        import numba.cuda.simulator  # noqa: F401
    except ImportError:
        return False
    return True


class CpuBackend(Backend):
    """Drives `devices` cpu cards of `memory` bytes each (default 4 GiB, or `HARP_CPU_MEMORY`)."""

    name = "cpu"
    preload = ("harp.backends.cpu", "harp.backends.cpu.kernels")
    rehearse = True          # host memory: an open takes nothing from a device

    def __init__(self, *, memory: int | str | None = None, devices: int = 1, **options: Any) -> None:
        super().__init__(**options)
        memory = memory if memory is not None else os.environ.get("HARP_CPU_MEMORY", DEFAULT_MEMORY)
        self.memory = parse_size(memory)
        self.cards = [CpuCard(i, self.memory) for i in range(int(devices))]
        # Facts that do not change while the process lives, found once (not per open).
        self._aten = torch_available()
        self._machine = platform.machine()

    def device_count(self) -> int:
        return len(self.cards)

    def _info(self, index: int, memory: int, trusted: bool) -> DeviceInfo:
        formats = ["catalog"]
        if self._aten:
            formats.append("aten")          # PyTorch operators by name: no client code
        if trusted and _numba_available():
            formats.append("numba-python")
        return DeviceInfo(kind="cpu", name=f"HARP cpu device ({self._machine})",
                          backend="cpu", index=index, memory=memory, formats=tuple(formats),
                          extra={"host_cores": os.cpu_count()})

    def describe(self, index: int) -> DeviceInfo:
        self.check_index(index)
        return self._info(index, self.memory, trusted=False)

    def open(self, index: int = 0, *, memory_quota: int | None = None,
             trust_client_code: bool = False, tenancy: Tenancy | None = None) -> Device:
        self.check_index(index)
        memory = self.memory if memory_quota is None else min(memory_quota, self.memory)
        if tenancy is None:
            tenancy = Tenancy(self.local_memory(index, self.memory, memory_quota))
        return CpuDevice(self.cards[index], self._info(index, memory, trust_client_code),
                         tenancy.memory, compute=tenancy.compute,
                         trust_client_code=trust_client_code)
