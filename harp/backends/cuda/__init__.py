"""The `cuda` backend: NVIDIA GPUs through CuPy (`pip install 'harp[cuda]'`).

**Not yet run on GPU hardware**: written against CuPy 14's documented API on a
machine without a GPU. What needs no GPU is tested everywhere (the catalog's
CUDA C compiles with NVRTC and assembles with ptxas, and runs correctly in a
host emulation of CUDA's thread model; PTX parsing; numba's array ABI against
numba's own PTX); the conformance suite runs on it where a GPU is present.

On a machine without CuPy, without a driver, without a visible GPU or without
NVRTC, the backend is listed and reports itself unavailable with the reason;
opening it raises `BackendError`, never anything else.

Options: `memory` (or `HARP_CUDA_MEMORY`) caps the bytes HARP hands out per GPU
(default: the card's total memory); `cupy` (or `HARP_CUDA_CUPY`) is the driver: the
CuPy module itself or the name to import it by (default `cupy`), so that a CuPy
build under another name, or the host-memory stand-in the tests use, drives the
same backend code. PyTorch operators (`aten`) run where torch with CUDA loads, or where
the driver's memory is host memory (`HARP_HOST_MEMORY`, the stand-in): `aten.py`.
"""
from __future__ import annotations

import os
from typing import Any

from ..driver import DriverBackend
from ...device import Device

from ...tenancy import Tenancy
from ...types import DeviceInfo
from ...units import parse_size
from . import nvml, nvrtc

__all__ = ["CudaBackend"]


class CudaBackend(DriverBackend):
    """Drives the CUDA GPUs this process can see (CuPy's device numbering)."""

    name = "cuda"

    @property
    def preload(self) -> tuple[str, ...]:
        """Importing CuPy touches no GPU, so a fork server may do it before it forks workers;
        so does importing torch, which a GPU's workers need to say whether they run `aten`
        (and then to run it): imported once there, not per session."""
        modules: tuple[str, ...] = ("harp.backends.cuda", "harp.backends.cuda.device", "cupy")
        from .aten import host_memory
        from ..aten import torch_available
        if self._cp is not None and not host_memory(self._cp) and torch_available():
            modules += ("harp.backends.aten", "harp.backends.cuda.aten", "torch")
        return modules

    def __init__(self, *, memory: int | str | None = None, cupy: Any = None,
                 **options: Any) -> None:
        super().__init__(**options)
        self._driver = cupy if cupy is not None else os.environ.get("HARP_CUDA_CUPY") or "cupy"
        memory = memory if memory is not None else os.environ.get("HARP_CUDA_MEMORY")
        self.memory_cap = parse_size(memory) if memory not in (None, "") else None
        self._cp: Any = None
        self._count = 0

    # -- availability ------------------------------------------------------------------
    def _probe(self) -> tuple[bool, str]:
        try:
            cupy = self._driver
            if isinstance(cupy, str):
                import importlib
                cupy = importlib.import_module(cupy)
        except Exception as exc:   # ImportError, or CuPy failing to find its CUDA libraries
            return False, (f"CuPy is not installed or does not load (pip install 'harp[cuda]'): "
                           f"{type(exc).__name__}: {exc}")
        try:
            count = int(cupy.cuda.runtime.getDeviceCount())
        except Exception as exc:   # no driver, driver too old, no device node
            return False, f"no usable CUDA driver or GPU: {type(exc).__name__}: {exc}"
        if count == 0:
            return False, "no CUDA GPU is visible to this process (check CUDA_VISIBLE_DEVICES)"
        ok, why = nvrtc.available()
        if not ok:
            return False, f"the kernel catalog needs NVRTC to compile: {why}"
        self._cp, self._count = cupy, count
        return True, ""

    def device_count(self) -> int:
        ok, _ = self.available()
        return self._count if ok else 0

    # -- devices -----------------------------------------------------------------------
    def _make_card(self, index: int) -> Any:
        from .card import CudaCard
        props = self._cp.cuda.runtime.getDeviceProperties(index)
        total = int(props["totalGlobalMem"])
        capacity = total if self.memory_cap is None else min(self.memory_cap, total)
        return CudaCard(self._cp, index, capacity, props)

    def _info(self, card: Any, memory: int, trusted: bool = False) -> DeviceInfo:
        props = card.props
        name = props.get("name", b"")
        name = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
        pci = _pci_bus_id(props)
        extra: dict[str, Any] = {
            "total_memory": int(props["totalGlobalMem"]),
            "multiprocessors": int(props.get("multiProcessorCount", 0)),
            "max_threads_per_block": card.max_threads,
            "pci_bus_id": pci,
            "cupy_version": str(getattr(self._cp, "__version__", "")),
        }
        rt = self._cp.cuda.runtime
        for key, probe in (("cuda_driver_version", rt.driverGetVersion),
                           ("cuda_runtime_version", rt.runtimeGetVersion)):
            try:
                extra[key] = int(probe())
            except Exception:
                pass
        ok, compiler = nvrtc.available()
        extra["nvrtc"] = compiler if ok else None
        extra.update(nvml.facts(card.index, pci))
        if card.broken:
            extra["broken"] = card.broken
        from .aten import unavailable
        from .device import FORMATS
        skip = {"aten"} if unavailable(self._cp) else set()
        if not (ok and trusted):
            skip.add("cuda-source")
        formats = tuple(f for f in FORMATS if f not in skip)
        return DeviceInfo(kind="gpu", name=name or f"CUDA GPU {card.index}", backend="cuda",
                          index=card.index, memory=memory, compute_capability=card.arch,
                          formats=formats, extra=extra)

    def telemetry(self, index: int) -> dict[str, float]:
        """Utilization, temperature and power from NVML (`{}` without it, or without a GPU)."""
        try:
            self._require()
            self.check_index(index)
            pci = _pci_bus_id(self._card(index).props)
        except Exception:
            return {}
        return nvml.readings(index, pci)

    def _session(self, card: Any, info: DeviceInfo, tenancy: Tenancy,
                 trust_client_code: bool) -> Device:
        from .device import CudaDevice
        return CudaDevice(info, tenancy.memory, card=card, compute=tenancy.compute,
                          trust_client_code=trust_client_code)


def _pci_bus_id(props: dict) -> str | None:
    """The PCI bus id NVML knows a GPU by, from CUDA's device properties."""
    if "pciBusID" not in props:
        return None
    return (f"{int(props.get('pciDomainID', 0)):08x}:{int(props['pciBusID']):02x}:"
            f"{int(props.get('pciDeviceID', 0)):02x}.0")
