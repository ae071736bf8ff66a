"""The backend plugin interface, versioned on its own, and backend discovery.

A backend drives one kind of real device in-process. Backends are found in the
`harp.backends` entry-point group, so a new device kind (an FPGA or NPU driver)
is one installable package that declares, in its own pyproject.toml:

    [project.entry-points."harp.backends"]
    mynpu = "mynpu_harp:Backend"

The object named there is a `Backend` subclass whose `interface_version`
equals `BACKEND_INTERFACE_VERSION`.
"""
from __future__ import annotations

import abc
from importlib import metadata
from typing import Any

import itertools
import threading

from ..device import Device
from ..errors import BackendError
from ..tenancy import Ledger, MemoryBroker, Tenancy
from ..types import DeviceInfo

#: The version of this interface; bump it when `Backend` changes incompatibly.
#: 2: `open` takes a `Tenancy` (memory broker and compute gate) from the server.
BACKEND_INTERFACE_VERSION = 2
ENTRY_POINT_GROUP = "harp.backends"


class Backend(abc.ABC):
    """A driver for one kind of device, able to open sessions on its devices."""

    #: The `BACKEND_INTERFACE_VERSION` this backend was written against.
    interface_version: int = BACKEND_INTERFACE_VERSION
    #: Short name used in addresses such as `local:NAME:INDEX`.
    name: str = ""
    #: Modules a pool server's fork server may import before it forks session workers
    #: (importing them must not touch a device).
    preload: tuple[str, ...] = ()
    #: Whether a pool server's warm worker may rehearse a session before it is handed one:
    #: open device 0 on an account of its own, run a call, close it. The first real
    #: session's open and calls then run on pages the worker has already touched (a
    #: fork's first touches are copy-on-write faults), which is most of what connecting
    #: through a worker costs. Only for backends whose open takes nothing from the device
    #: (no context, no device memory), such as host-memory devices.
    rehearse: bool = False

    def __init__(self, **options: Any) -> None:
        self.options = options
        self._ledger = Ledger()
        self._ledger_lock = threading.Lock()
        self._local_ids = itertools.count(1)

    def available(self) -> tuple[bool, str]:
        """Whether this machine can run the backend, and if not, why (never raises)."""
        return True, ""

    @abc.abstractmethod
    def device_count(self) -> int:
        """How many devices this backend drives here."""

    @abc.abstractmethod
    def describe(self, index: int) -> DeviceInfo:
        """Facts about device `index` as a whole (the card, not a session's quota)."""

    @abc.abstractmethod
    def open(self, index: int = 0, *, memory_quota: int | None = None,
             trust_client_code: bool = False, tenancy: Tenancy | None = None) -> Device:
        """A new session on device `index`, with its own handles, streams and errors.

        `tenancy` is what a pool server grants the session: the `MemoryBroker` every byte
        the session's device memory (and kept module images) must be reserved from, and
        the `ComputeGate` its kernels run under. Without one (a device used in its own
        process), the backend accounts memory itself against the device's capacity and
        `memory_quota` (`local_memory`), and nothing gates kernels.
        `trust_client_code` allows image formats that run or compile client code here.
        """

    def telemetry(self, index: int) -> dict[str, float]:
        """Live readings of device `index` for a pool server's metrics, those the backend
        can take: `utilization` (busy fraction, 0 to 1), `temperature_celsius`,
        `power_watts`. Never raises; `{}` when it has none (the default: a pool server
        still counts each device's kernel time itself)."""
        return {}

    def local_memory(self, index: int, capacity: int, quota: int | None) -> MemoryBroker:
        """A session's account in this backend's own ledger of device `index`."""
        with self._ledger_lock:
            self._ledger.add_device(index, capacity)
        return self._ledger.open(f"local-{next(self._local_ids)}", index, quota=quota)

    def local_used(self, index: int) -> int:
        """Bytes the sessions opened without a tenancy hold on device `index`."""
        with self._ledger_lock:
            self._ledger.add_device(index, 0)
        return self._ledger.used(index)

    def check_index(self, index: int) -> None:
        """Raise a clear `BackendError` for an index this backend does not have."""
        n = self.device_count()
        if not isinstance(index, int) or not 0 <= index < n:
            raise BackendError(f"backend {self.name!r} has {n} device(s); no device {index!r}")


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _builtin() -> dict[str, str]:
    # Built-ins are listed here too, so HARP works from a source tree that was
    # never installed (no entry-point metadata).
    return {"cpu": "harp.backends.cpu:CpuBackend", "cuda": "harp.backends.cuda:CudaBackend",
            "opencl": "harp.backends.opencl:OpenclBackend", "onnx": "harp.backends.onnx:OnnxBackend"}


def backend_names() -> list[str]:
    """Names of every backend known here: built-in and installed plugins."""
    return sorted(set(_builtin()) | set(_entry_points()))


def backend_class(name: str) -> type[Backend]:
    """The backend class registered under `name`, checked against this interface version."""
    eps = _entry_points()
    if name in eps:
        target = eps[name]
        try:
            cls = target.load()
        except Exception as exc:  # a broken plugin must not take HARP down with it
            raise BackendError(f"backend plugin {name!r} ({target.value}) failed to load: {exc}") \
                from exc
        source = f"plugin {target.value}"
    elif name in _builtin():
        module, _, attr = _builtin()[name].partition(":")
        import importlib
        cls = getattr(importlib.import_module(module), attr)
        source = "built-in"
    else:
        raise BackendError(f"unknown backend {name!r}; known backends: "
                           f"{', '.join(backend_names())}")
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise BackendError(f"backend {name!r} ({source}) is not a harp.backends.Backend subclass")
    version = getattr(cls, "interface_version", None)
    if version != BACKEND_INTERFACE_VERSION:
        raise BackendError(
            f"backend {name!r} ({source}) implements backend interface version {version!r}, "
            f"but this HARP needs version {BACKEND_INTERFACE_VERSION}; "
            "upgrade the plugin or HARP so they match")
    return cls


def load_backend(name: str, **options: Any) -> Backend:
    """An instance of backend `name`, configured with `options`."""
    backend = backend_class(name)(**options)
    backend.name = backend.name or name
    backend.options = dict(options)      # all of them: a worker process builds its own from these
    return backend


def list_devices() -> list[dict[str, Any]]:
    """Every backend with its availability and devices, for `harp devices`."""
    rows: list[dict[str, Any]] = []
    for name in backend_names():
        try:
            backend = load_backend(name)
            ok, reason = backend.available()
            devices = [backend.describe(i).to_dict() for i in range(backend.device_count())] \
                if ok else []
        except BackendError as exc:
            ok, reason, devices = False, str(exc), []
        rows.append({"backend": name, "available": ok, "reason": reason, "devices": devices})
    return rows
