"""The device session behind HARP's numba.cuda: one per process, opened on first use.

The session also gives HARP's streams the ordering a numba program expects from
CUDA's *legacy default stream*: work on the default stream waits for earlier
work on every other stream, and work on another stream waits for earlier work
on the default stream (numba's `cuda.stream()` makes such blocking streams). A
HARP device's default stream is an ordinary stream, so the session inserts the
event record/wait pairs that give the same order, and only when streams besides
the default one are in use.
"""
from __future__ import annotations

import atexit
import collections
import os
import threading
from typing import Any

from harp.device import Device
from harp.runenv import open_from_env
from harp.errors import HarpError, UnsupportedError
from harp.types import DEFAULT_STREAM, Buffer, Event, Function, Stream

from .kernelerrors import KernelErrors

#: Image formats the shim can produce for a numba kernel, best first.
KERNEL_FORMATS = ("ptx", "numba-python")


class Session:
    """A `Device` plus what the shim keeps per session: loaded kernels, stream order, frees."""

    def __init__(self, device: Device, *, owned: bool = True, target: str | None = None) -> None:
        self.device = KernelErrors(device)     # kernels' exceptions as their own type
        self.info = device.info
        self.owned = owned
        self.target = target
        self.pid = os.getpid()
        self.closed = False
        self.lock = threading.RLock()
        self._freed: collections.deque[Buffer] = collections.deque()
        self._functions: dict[Any, Function] = {}
        self._streams: dict[int, Stream] = {}      # user streams by id
        self._dirty: set[int] = set()      # streams with work the default stream has not joined
        self._behind: set[int] = set()     # streams that must join the default stream first
        self._tails: dict[int, Event] = {}         # one reusable event per stream for the joins
        self._event_stream: Stream | None = None   # private, for Event.synchronize

    # -- facts -------------------------------------------------------------------
    @property
    def kernel_format(self) -> str | None:
        """The format numba kernels go to this device in: "ptx", "numba-python" or None."""
        for fmt in KERNEL_FORMATS:
            if fmt in self.info.formats:
                return fmt
        return None

    @property
    def remote(self) -> bool:
        """Whether the device is on a pool server (not in this process)."""
        from ..remote import RemoteDevice
        device: Any = self.device
        for _ in range(8):                       # through wrappers such as the trace recorder
            if isinstance(device, RemoteDevice):
                return True
            inner = getattr(device, "_inner", None)
            if inner is None:
                return False
            device = inner
        return False

    def require_kernel_format(self) -> str:
        fmt = self.kernel_format
        if fmt is None:
            hint = (" (a cpu device runs numba kernels only when it trusts client code: "
                    "`harp server serve --trust-client-code`, or `harp run --device local:cpu`)"
                    if self.info.kind == "cpu" else "")
            raise UnsupportedError(f"device {self.info.name!r} accepts "
                                   f"{', '.join(self.info.formats)}; numba kernels need one of "
                                   f"{', '.join(KERNEL_FORMATS)}{hint}")
        return fmt

    def check_open(self) -> None:
        if self.closed:
            raise HarpError("this HARP numba.cuda session is closed (cuda.close() or "
                            "device.reset()); arrays, streams and events from it are gone")
        if self.pid != os.getpid():
            raise HarpError("this HARP session belongs to the parent process (fork): objects made "
                            "before the fork cannot be used in the child; make new ones")

    # -- memory --------------------------------------------------------------------
    def alloc(self, nbytes: int) -> Buffer:
        with self.lock:
            self.check_open()
            self._drain_frees()
            return self.device.alloc(nbytes)

    def release(self, buf: Buffer) -> None:
        """Free `buf` at the session's next call (safe from a finalizer in any thread)."""
        if not self.closed and self.pid == os.getpid():
            self._freed.append(buf)

    def _drain_frees(self) -> None:
        while self._freed:
            self.device.free(self._freed.popleft())

    # -- ordering ------------------------------------------------------------------
    def enter(self, stream: Stream | None) -> Stream:
        """Order the next call on `stream` as the legacy default stream would; returns the handle.

        Call with `lock` held, right before the call.
        """
        self.check_open()
        self._drain_frees()
        device = self.device
        if stream is None or stream.id == DEFAULT_STREAM.id:
            for sid in self._dirty:
                tail = self._tail(sid)
                device.record(tail, self._streams[sid])
                device.wait(DEFAULT_STREAM, tail)
            self._dirty.clear()
            self._behind = set(self._streams)
            return DEFAULT_STREAM
        if stream.id not in self._streams:
            raise HarpError("this stream belongs to another HARP session")
        if stream.id in self._behind:
            tail = self._tail(DEFAULT_STREAM.id)
            device.record(tail, DEFAULT_STREAM)
            device.wait(stream, tail)
            self._behind.discard(stream.id)
        self._dirty.add(stream.id)
        return stream

    def _tail(self, sid: int) -> Event:
        event = self._tails.get(sid)
        if event is None:
            event = self._tails[sid] = self.device.event()
        return event

    def new_stream(self) -> Stream:
        with self.lock:
            self.check_open()
            stream = self.device.stream()
            self._streams[stream.id] = stream
            self._behind.add(stream.id)     # earlier default-stream work comes first
            return stream

    def new_event(self) -> Event:
        with self.lock:
            self.check_open()
            return self.device.event()

    def synchronize(self, stream: Stream | None = None) -> None:
        with self.lock:
            self.check_open()
            self._drain_frees()
            if stream is None:
                self.device.synchronize()
                self._dirty.clear()
                self._behind.clear()
            else:
                self.device.synchronize(stream)
                self._dirty.discard(stream.id)

    def event_synchronize(self, event: Event) -> None:
        """Wait until the latest recording of `event` has completed."""
        with self.lock:
            self.check_open()
            if self._event_stream is None:
                self._event_stream = self.device.stream()
            self.device.wait(self._event_stream, event)
            self.device.synchronize(self._event_stream)

    # -- kernels -------------------------------------------------------------------
    def function(self, key: Any, image: str | bytes, fmt: str, name: str) -> Function:
        """The kernel `name` of `image`, loaded once per session under `key`."""
        with self.lock:
            fn = self._functions.get(key)
            if fn is None:
                self.check_open()
                module = self.device.load_module(image, fmt)
                fn = self._functions[key] = self.device.function(module, name)
            return fn

    # -- lifetime ------------------------------------------------------------------
    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self._freed.clear()
            if self.owned and self.pid == os.getpid():
                self.device.close()


# -- the process's session --------------------------------------------------------

_current: Session | None = None
_current_lock = threading.Lock()
_atexit_registered = False


def current() -> Session:
    """The process's session, opened on first use."""
    global _current, _atexit_registered
    session = _current
    if session is not None and not session.closed and session.pid == os.getpid():
        return session
    with _current_lock:
        session = _current
        if session is None or session.closed or session.pid != os.getpid():
            device, target = open_from_env()
            session = _current = Session(device, owned=True, target=target)
            if not _atexit_registered:
                atexit.register(close_current)
                _atexit_registered = True
        return session


def peek() -> Session | None:
    """The process's session if one is open, without opening one."""
    session = _current
    if session is not None and not session.closed and session.pid == os.getpid():
        return session
    return None


def use_device(device: Device) -> Session:
    """Make numba.cuda calls of this process use `device` (an open `harp.Device`).

    The caller keeps ownership: closing the session does not close the device.
    """
    global _current
    with _current_lock:
        old = _current
        _current = Session(device, owned=False, target=None)
    if old is not None and old.pid == os.getpid():
        old.close()
    return _current


def close_current() -> None:
    """Close the process's session (numba's `cuda.close()`); the next use opens a new one."""
    global _current
    with _current_lock:
        session, _current = _current, None
    if session is not None and session.pid == os.getpid():
        session.close()
