"""The `opencl` backend: any OpenCL device through PyOpenCL (`pip install 'harp[opencl]'`).

GPUs, FPGA boards (ACCELERATOR or CUSTOM devices) and CPUs alike: every device
of every platform the OpenCL ICD loader finds here (or of the platform named
by the `platform` option), in a stable order. PoCL, the OpenCL implementation
on the CPU, is what the test suite runs it on.

Options: `memory` (or `HARP_OPENCL_MEMORY`) caps the bytes HARP hands out per
device (default: the device's global memory); `platform` (or
`HARP_OPENCL_PLATFORM`) keeps only the platforms whose name contains it (case
ignored); `binaries` (or `HARP_OPENCL_BINARIES`) is a directory of program
binaries the operator installed (`*.bin`, what clGetProgramInfo BINARIES gives for
the device, e.g. an FPGA bitstream's program): their kernels appear as catalog
entries of every device that accepts them (`function(catalog, "name")`, listed in
`info.extra["installed_kernels"]`; a catalog name wins over an installed one);
`cl` is the driver module itself (default: PyOpenCL, imported on first
use), so a test can stand in for it.

Without PyOpenCL, an ICD loader, a platform or a device, the backend is listed
and reports itself unavailable with the reason (`available` never raises);
`open` and `describe` then raise `BackendError`.

One OpenCL context per device and process (`OpenclCard`, created on the first
`open` or `describe`), shared by the sessions of the process; each session has
its own command queues. Importing this package, or PyOpenCL, touches no device,
so a pool server's fork server preloads both.

Not supported: the catalog on boards that cannot compile OpenCL C online (its
`load_module` is a deferred `DeviceError` with the build log; such boards take
`opencl-binary` modules and installed binaries), images, pipes, SVM, and OpenCL's
own device partitioning.
"""
from __future__ import annotations

import importlib
import os
from typing import Any

from ..driver import DriverBackend
from ...device import Device
from ...errors import BackendError
from ...tenancy import Tenancy
from ...types import DeviceInfo
from ...units import parse_size

__all__ = ["OpenclBackend"]


class OpenclBackend(DriverBackend):
    """Drives the OpenCL devices this process can see (every platform's, in order)."""

    name = "opencl"
    #: Importing PyOpenCL creates no context, so a fork server may do it before it forks.
    preload = ("harp.backends.opencl", "harp.backends.opencl.device", "pyopencl")

    def __init__(self, *, memory: int | str | None = None, cl: Any = None,
                 platform: str | None = None, binaries: str | None = None,
                 **options: Any) -> None:
        super().__init__(**options)
        self._driver = cl
        memory = memory if memory is not None else os.environ.get("HARP_OPENCL_MEMORY")
        self.memory_cap = parse_size(memory) if memory not in (None, "") else None
        self.binaries = binaries if binaries is not None else \
            os.environ.get("HARP_OPENCL_BINARIES") or None
        self.platform = platform if platform is not None else \
            os.environ.get("HARP_OPENCL_PLATFORM") or None
        self._cl: Any = None
        self._devices: list[Any] = []

    # -- availability ------------------------------------------------------------------
    def _probe(self) -> tuple[bool, str]:
        cl = self._driver
        if cl is None:
            try:
                cl = importlib.import_module("pyopencl")
            except Exception as exc:     # ImportError, or a PyOpenCL without its ICD loader
                return False, (f"PyOpenCL is not installed or does not load "
                               f"(pip install 'harp[opencl]'): {type(exc).__name__}: {exc}")
        try:
            platforms = list(cl.get_platforms())
        except Exception as exc:         # no ICD loader, or no platform registered with it
            return False, f"no OpenCL platform here: {type(exc).__name__}: {exc}"
        if self.platform:
            names = [str(p.name) for p in platforms]
            platforms = [p for p in platforms if self.platform.lower() in str(p.name).lower()]
            if not platforms:
                return False, (f"no OpenCL platform named like {self.platform!r}; the "
                               f"platforms here are: {', '.join(names) or 'none'}")
        devices: list[Any] = []
        for p in platforms:
            try:
                devices.extend(p.get_devices())
            except Exception:            # DEVICE_NOT_FOUND: a platform without devices
                continue
        if not devices:
            return False, ("the OpenCL platforms here have no devices: "
                           f"{', '.join(str(p.name) for p in platforms) or 'none'}")
        self._cl, self._devices = cl, devices
        return True, ""

    def device_count(self) -> int:
        ok, _ = self.available()
        return len(self._devices) if ok else 0

    # -- devices -----------------------------------------------------------------------
    def _make_card(self, index: int) -> Any:
        from .device import OpenclCard
        try:
            return OpenclCard(self._cl, index, self._devices[index], self.memory_cap,
                              binaries=self.binaries)
        except Exception as exc:
            raise BackendError(f"OpenCL device {index} does not answer: "
                               f"{type(exc).__name__}: {exc}") from exc

    def _info(self, card: Any, memory: int, trusted: bool = False) -> DeviceInfo:
        formats = ("catalog", "opencl-binary") + (("opencl-source",) if trusted else ())
        return DeviceInfo(kind=card.kind, name=card.name, backend="opencl", index=card.index,
                          memory=memory, formats=formats, extra=dict(card.facts))

    def _session(self, card: Any, info: DeviceInfo, tenancy: Tenancy,
                 trust_client_code: bool) -> Device:
        from .device import OpenclDevice
        return OpenclDevice(info, tenancy.memory, card=card, compute=tenancy.compute,
                            trust_client_code=trust_client_code)
