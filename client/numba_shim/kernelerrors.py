"""A kernel's own exceptions, raised in the program as their own type.

A numba-python kernel runs Python in Numba's simulator on the device, and an
exception it raises (an `IndexError`, a `raise ValueError(...)`, a user's own
exception class) fails its launch there. Launches are asynchronous, so the device
reports it at the session's next sync call as a `DeviceError` worded by
`harp.errors.kernel_raised`. Numba raises the exception itself: the shim's device
(`KernelErrors`) turns such a `DeviceError` back into the exception's own type at
every sync call, chained to the `DeviceError` (which names the launch). Exception
classes a kernel reads from its globals that are not Python's own travel to the
device as stand-ins of the same name (`source.py`) and are registered here, so the
program gets its own class back.
"""
from __future__ import annotations

import builtins
import threading
from typing import Any

from harp.errors import HarpError, kernel_exception

_USER: dict[str, type[BaseException]] = {}
_LOCK = threading.Lock()


def register(cls: type[BaseException]) -> None:
    """Raise `cls` for a kernel exception named `cls.__name__` (a class of the program)."""
    with _LOCK:
        _USER[cls.__name__] = cls


def exception_class(name: str) -> type[BaseException] | None:
    """The exception class a device names `name`: the program's registered one, or Python's."""
    cls = _USER.get(name)
    if cls is None:
        cls = getattr(builtins, name, None)
    # Exception, not BaseException: a kernel does not end the program (SystemExit)
    return cls if isinstance(cls, type) and issubclass(cls, Exception) else None


def translate(error: HarpError) -> BaseException:
    """The exception to raise for `error`: the kernel's own, if it is one, else `error`."""
    found = kernel_exception(error)
    if found is None:
        return error
    _, name, message = found
    cls = exception_class(name)
    if cls is None:
        return error
    try:
        exc = cls(message)
    except Exception:     # a class whose constructor wants other arguments
        return error
    exc.__cause__ = error
    return exc


class KernelErrors:
    """A `Device` whose sync calls raise kernel exceptions as their own type (`translate`);
    everything else is the device's own."""

    def __init__(self, device: Any) -> None:
        self._inner = device

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _sync(self, call: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self._inner, call)(*args, **kwargs)
        except HarpError as error:
            exc = translate(error)
            if exc is error:
                raise
            raise exc from error

    def synchronize(self, *args: Any, **kwargs: Any) -> Any:
        return self._sync("synchronize", *args, **kwargs)

    def read(self, *args: Any, **kwargs: Any) -> Any:
        return self._sync("read", *args, **kwargs)

    def elapsed(self, *args: Any, **kwargs: Any) -> Any:
        return self._sync("elapsed", *args, **kwargs)

    def mem_info(self, *args: Any, **kwargs: Any) -> Any:
        return self._sync("mem_info", *args, **kwargs)
