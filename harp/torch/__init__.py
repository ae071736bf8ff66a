"""PyTorch on a HARP device: `torch.device("harp")`, computed where the device is.

    import torch, harp.torch
    harp.torch.use(harp.connect("harp://pool:50051"))   # or HARP_DEVICE / harp run
    model = Net().to("harp")
    loss = model(x.to("harp")).sum(); loss.backward()

Importing this module registers torch's `PrivateUse1` device under the name
`harp` (`torch.device("harp")`, `tensor.to("harp")`, `tensor.harp()`,
`module.harp()`), through torch's Python backend registration: no C++. A harp
tensor's storage is a buffer on the session's device; its operators run there,
by torch, on the pool server (`harp.torch.dispatch` says how). `harp run`
imports it when the program imports torch, and so does `HARP_TORCH=1`.
"""
from __future__ import annotations

import atexit
from typing import Any

import torch

from .session import TorchSession, current, reset, use
from .tensor import HarpTensor

__all__ = ["use", "current", "reset", "synchronize", "empty_cache", "HarpTensor", "TorchSession",
           "is_registered"]

_registered = False
_library: Any = None


class _BackendModule:
    """`torch.harp`: what torch asks of a device module."""

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def is_initialized() -> bool:
        return True

    @staticmethod
    def _is_in_bad_fork() -> bool:
        return False

    @staticmethod
    def _lazy_init() -> None:
        """Nothing to start: the session opens with the first `harp` tensor."""

    @staticmethod
    def manual_seed(seed: int) -> None:
        current().seed(seed)

    @staticmethod
    def manual_seed_all(seed: int) -> None:
        from . import session as _s
        if _s._current is not None:         # torch.manual_seed seeds every device: only an
            _s._current.seed(seed)          # open session is seeded, none is opened for it

    @staticmethod
    def synchronize(device: Any = None) -> None:
        current().device.synchronize()


def synchronize() -> None:
    """Wait for every operator queued on the harp device (and raise what failed)."""
    current().device.synchronize()


def empty_cache() -> None:
    """Free the device buffers kept for reuse by freed tensors (torch.cuda.empty_cache)."""
    current().empty_cache()


def is_registered() -> bool:
    return _registered


def _quiesce() -> None:
    """At exit: wait for the operators still queued (a local device runs them on its own
    threads, and torch must not be running one while the interpreter finalizes)."""
    from . import session as _s
    if _s._current is not None:
        try:
            _s._current.device.synchronize()
        except Exception:
            pass


def register() -> None:
    """Register the `harp` device with torch (once; importing this module does it)."""
    global _registered, _library
    if _registered:
        return
    from torch.utils.backend_registration import _setup_privateuseone_for_python_backend
    from . import dispatch
    _setup_privateuseone_for_python_backend("harp", backend_module=_BackendModule())
    _library = torch.library.Library("aten", "IMPL")
    _library.impl("empty.memory_format", dispatch.factory_empty, "PrivateUse1")
    _library.impl("empty_strided", dispatch.factory_empty_strided, "PrivateUse1")
    for name in dispatch.FACTORIES:           # made on the device, by torch there
        _library.impl(name, dispatch.factory(name), "PrivateUse1")
    atexit.register(_quiesce)
    _registered = True


register()
