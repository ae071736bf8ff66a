"""Streams and events of HARP's numba.cuda, over the session device's streams and events."""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

from harp.types import DEFAULT_STREAM, Event as HarpEvent, Stream as HarpStream

from .errors import unsupported
from .session import Session, current


def stream_handle(stream: Any, session: Session) -> HarpStream | None:
    """A numba stream argument (0, None, a shim Stream) as a HARP handle (None: default)."""
    if stream is None or (isinstance(stream, int) and not isinstance(stream, bool) and stream == 0):
        return None
    if isinstance(stream, Stream):
        if stream.session is not session:
            raise ValueError("the stream belongs to another HARP session")
        return stream.handle
    if isinstance(stream, int):
        unsupported("a raw CUDA stream handle as a stream argument",
                    "pass a stream made by cuda.stream(), or 0 for the default stream")
    raise TypeError(f"expected a stream from cuda.stream() or 0, got {type(stream).__name__}")


class Stream:
    """numba's `cuda.stream()`: an in-order queue of device work (a HARP stream)."""

    def __init__(self, session: Session, handle: HarpStream | None, kind: str = "stream") -> None:
        self.session = session
        self._handle = handle
        self._kind = kind

    @property
    def handle(self) -> HarpStream | None:
        """The HARP stream handle; None for the default stream."""
        return self._handle

    def synchronize(self) -> None:
        """Wait for all work queued on this stream."""
        self.session.synchronize(self._handle if self._handle is not None else DEFAULT_STREAM)

    @contextlib.contextmanager
    def auto_synchronize(self) -> Iterator["Stream"]:
        """A context that synchronizes the stream when it exits."""
        yield self
        self.synchronize()

    def add_callback(self, callback: Any, arg: Any = None) -> None:
        unsupported("Stream.add_callback", "host callbacks do not run on a HARP device")

    def async_done(self) -> Any:
        unsupported("Stream.async_done", "host callbacks do not run on a HARP device")

    def __int__(self) -> int:
        unsupported("int(stream)", "a HARP stream has no CUDA handle in this process")

    def __bool__(self) -> bool:
        # numba treats a falsy stream argument as "the array's default stream"; a stream
        # object is always an explicit choice.
        return True

    def __repr__(self) -> str:
        what = "default stream" if self._handle is None else f"stream {self._handle.id:#x}"
        return f"<HARP {what} on {self.session.info.name!r}>"


class Event:
    """numba's `cuda.event()`: a marker recorded on a stream (a HARP event)."""

    def __init__(self, session: Session, timing: bool = True) -> None:
        self.session = session
        self.timing = timing
        self.handle: HarpEvent = session.new_event()
        self._recorded = False

    def _stream(self, stream: Any) -> HarpStream | None:
        return stream_handle(stream, self.session)

    def record(self, stream: Any = 0) -> None:
        """Record the event on `stream`: it completes when the stream's earlier work has."""
        session = self.session
        with session.lock:
            handle = session.enter(self._stream(stream))
            session.device.record(self.handle, handle)
            self._recorded = True

    def wait(self, stream: Any = 0) -> None:
        """Make later work on `stream` wait for this event."""
        session = self.session
        with session.lock:
            handle = session.enter(self._stream(stream))
            session.device.wait(handle, self.handle)

    def synchronize(self) -> None:
        """Wait until the event has completed (at once if it was never recorded)."""
        if self._recorded:
            self.session.event_synchronize(self.handle)

    def query(self) -> bool:
        """Whether the event has completed. HARP answers after waiting for it, so this
        returns True (a true answer, reached by blocking rather than polling)."""
        self.synchronize()
        return True

    def elapsed_time(self, evtend: "Event") -> float:
        """Milliseconds from this event to `evtend` (both recorded, with timing)."""
        return event_elapsed_time(self, evtend)

    def __repr__(self) -> str:
        return f"<HARP event {self.handle.id:#x}>"


def event_elapsed_time(evtstart: Event, evtend: Event) -> float:
    """Milliseconds between two recorded events."""
    if not (evtstart.timing and evtend.timing):
        raise RuntimeError("elapsed_time needs two events created with timing=True")
    if evtstart.session is not evtend.session:
        raise ValueError("the events belong to different HARP sessions")
    session = evtstart.session
    with session.lock:
        session.check_open()
        return session.device.elapsed(evtstart.handle, evtend.handle)


def stream() -> Stream:
    """numba's `cuda.stream()`: a new stream on the session's device."""
    session = current()
    return Stream(session, session.new_stream())


def default_stream() -> Stream:
    """The default stream (numba's legacy default stream)."""
    return Stream(current(), None, "default")


legacy_default_stream = default_stream

_PER_THREAD = threading.local()


def per_thread_default_stream() -> Stream:
    """numba's `cuda.per_thread_default_stream()`: one stream per host thread (made on its
    first use in the thread), ordered against the legacy default stream as CUDA orders a
    per-thread default stream."""
    session = current()
    mine = getattr(_PER_THREAD, "stream", None)
    if mine is None or mine.session is not session:
        mine = _PER_THREAD.stream = stream()
    return mine


def event(timing: bool = True) -> Event:
    """numba's `cuda.event()`."""
    return Event(current(), timing)
