"""The `Device` interface: the one driver-level contract that every backend, the
remote client and the trace recorder implement.

Calls are asynchronous unless marked *sync*: they return at once, and a failure
in one is raised at the next sync call of the same session, naming the failed
call. Shape errors that need no device state (a negative size, a range past the
end of the buffer, a wrong argument type) are raised at once, identically by
every implementation, because the handle carries its size.
"""
from __future__ import annotations

import abc
from typing import Any, Sequence

from .types import Buffer, DeviceInfo, Event, Function, KernelArg, MemInfo, Module, Stream

Dims = int | Sequence[int]


class Device(abc.ABC):
    """A device as a program sees it: memory, code, ordering and facts."""

    # -- facts ---------------------------------------------------------------
    @property
    @abc.abstractmethod
    def info(self) -> DeviceInfo:
        """Facts about the device (kind, name, memory, accepted image formats)."""

    @abc.abstractmethod
    def mem_info(self) -> MemInfo:
        """*sync* Free and total bytes for this session (the quota when one applies)."""

    # -- memory --------------------------------------------------------------
    @abc.abstractmethod
    def alloc(self, nbytes: int) -> Buffer:
        """Allocate `nbytes` of device memory; running out is reported at the next sync call."""

    @abc.abstractmethod
    def free(self, buf: Buffer) -> None:
        """Release a buffer; the handle is invalid from this call on."""

    @abc.abstractmethod
    def write(self, buf: Buffer, offset: int, data: Any, stream: Stream | None = None) -> None:
        """Copy host bytes (any buffer-protocol object) to the device at `offset`.

        Returns once `data` has been consumed, so the caller may reuse it at once.
        """

    @abc.abstractmethod
    def read(self, buf: Buffer, offset: int, nbytes: int, out: Any = None,
             stream: Stream | None = None) -> Any:
        """*sync* Copy `nbytes` from the device into `out` and return `out`, or return new `bytes`.

        Without `out` the result is immutable `bytes`, made with a single copy.

        Ordered after earlier work on `stream`; raises any deferred error first.
        """

    @abc.abstractmethod
    def copy(self, dst: Buffer, dst_offset: int, src: Buffer, src_offset: int, nbytes: int,
             stream: Stream | None = None) -> None:
        """Device-to-device copy of `nbytes`."""

    @abc.abstractmethod
    def fill(self, buf: Buffer, value: int, offset: int = 0, nbytes: int | None = None,
             stream: Stream | None = None) -> None:
        """Set `nbytes` (default: to the end) starting at `offset` to the byte `value` (memset)."""

    # -- code ----------------------------------------------------------------
    @abc.abstractmethod
    def load_module(self, image: bytes | str, format: str) -> Module:
        """Load a kernel image of one of `info.formats`."""

    @abc.abstractmethod
    def function(self, module: Module, name: str) -> Function:
        """Look up the kernel `name` in a module."""

    @abc.abstractmethod
    def launch(self, fn: Function, grid: Dims, block: Dims, args: Sequence[Any],
               shared_mem: int = 0, stream: Stream | None = None) -> None:
        """Launch a kernel; `args` are `BufferArg`, `ArrayArg`, `Scalar` (or a `Buffer`/NumPy scalar)."""

    # -- order ---------------------------------------------------------------
    @abc.abstractmethod
    def stream(self) -> Stream:
        """A new stream: its calls run in order, independently of other streams."""

    @abc.abstractmethod
    def event(self) -> Event:
        """A new event, to order streams and to time work."""

    @abc.abstractmethod
    def record(self, event: Event, stream: Stream | None = None) -> None:
        """Record `event` on `stream`: it completes when earlier work on the stream has."""

    @abc.abstractmethod
    def wait(self, stream: Stream, event: Event) -> None:
        """Make later work on `stream` wait for the latest recording of `event`."""

    @abc.abstractmethod
    def synchronize(self, stream: Stream | None = None) -> None:
        """*sync* Wait for `stream` (or every stream) and raise any deferred error."""

    @abc.abstractmethod
    def elapsed(self, start: Event, end: Event) -> float:
        """*sync* Milliseconds between two recorded events (as CUDA's cuEventElapsedTime)."""

    # -- lifetime ------------------------------------------------------------
    @abc.abstractmethod
    def close(self) -> None:
        """End the session: drop work not yet started, free everything it holds."""

    def __enter__(self) -> "Device":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Device", "Dims", "KernelArg"]
