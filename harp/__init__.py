"""HARP: use pooled accelerators (GPUs, FPGAs, NPUs) as if they were local.

`harp.connect(address)` returns a `Device`; everything else is its methods.
"""
from __future__ import annotations

import os as _os

# gRPC core writes its own log lines (TLS handshake failures, a port in use, ...) to stderr
# unless told otherwise; HARP reports those failures itself, as typed errors. Set before gRPC
# loads; GRPC_VERBOSITY=INFO (or DEBUG) brings them back for debugging.
_os.environ.setdefault("GRPC_VERBOSITY", "NONE")

from .catalog import CATALOG_IMAGE  # noqa: E402
from .device import Device
from .errors import (ArgumentError, AuthError, BackendError, DeviceError, HarpError,
                     InternalError, InvalidHandleError, LeaseError, NoCapacityError, NotLeaderError,
                     OutOfMemoryError, PermissionDeniedError, ProtocolError, QuotaError, TransportError,
                     UnsupportedError, VersionMismatchError)
from .lease import Lease, LeaseDevice
from .types import (ArrayArg, Buffer, BufferArg, DeviceInfo, Event, Function, MemInfo, Module,
                    Scalar, Stream)

__version__ = "0.1.0"

if _os.environ.get("HARP_TORCH") == "1":       # torch's `harp` device, once torch is imported
    from .runhook import install_torch_hook as _install_torch_hook
    _install_torch_hook()


def connect(target: str | None = None, **options):  # noqa: ANN201 - returns a Device
    """Open a session on a device: "local:cpu", "local:BACKEND:INDEX" or "harp://HOST:PORT"."""
    from .connection import connect as _connect
    return _connect(target, **options)


def __getattr__(name: str):  # noqa: ANN202 - lazy exports, so `import harp` stays light
    if name in ("RawKernel", "RawModule"):
        from harp.client import raw
        return getattr(raw, name)
    raise AttributeError(f"module 'harp' has no attribute {name!r}")


__all__ = [
    "connect", "Device", "Lease", "LeaseDevice", "CATALOG_IMAGE", "Buffer", "BufferArg", "ArrayArg", "Scalar", "Module",
    "Function", "Stream", "Event", "DeviceInfo", "MemInfo", "HarpError", "ArgumentError",
    "InvalidHandleError", "UnsupportedError", "PermissionDeniedError", "DeviceError",
    "OutOfMemoryError", "QuotaError", "NoCapacityError", "AuthError", "LeaseError", "ProtocolError",
    "VersionMismatchError", "TransportError", "NotLeaderError", "BackendError", "InternalError",
    "RawKernel", "RawModule",
]
