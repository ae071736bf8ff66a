"""`TraceRecorder`: a `Device` that passes every call to another one and records it.

The hot path (an asynchronous call such as `launch`) takes two clock readings
and appends one tuple to a queue; encoding (msgpack), compression (zstandard)
and the write happen in batches, at the next sync call, every `FLUSH_CALLS`
calls, at least once a second while calls arrive, and on close. Each batch is
one framed block, so a crash loses at most the calls not yet written plus the
block being written (see docs/trace-format.md).

The recorder changes nothing the program sees: the same results, the same
exceptions (the very objects the inner device raised), the same call numbers.
"""
from __future__ import annotations

import collections
import hashlib
import itertools
import logging
import os
import platform
import socket
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from harp.device import Device, Dims
from harp.types import (ArrayArg, Buffer, BufferArg, DeviceInfo, Event, Function, MemInfo,
                        Module, Scalar, Stream)

from . import format as fmt
from .format import (ALLOC, CLOSE, COPY, ELAPSED, EVENT, FILL, FREE, FUNCTION, LAUNCH,
                     LOAD_MODULE, MEM_INFO, READ, RECORD, STREAM, SYNCHRONIZE, WAIT, WRITE)

log = logging.getLogger("harp.trace")

#: Calls held in memory before a block is written even without a sync call (a power of 2).
FLUSH_CALLS = 4096
#: ... and the longest time (ns) a recorded call waits in memory while calls keep coming.
FLUSH_NS = 1_000_000_000
#: File suffix of traces.
SUFFIX = ".harptrace"

_now = time.monotonic_ns
_HANDLES = (Buffer, Module, Function, Stream, Event)


class TraceWriter:
    """The file side of a recording: queued call records, blobs, blocks. Thread-safe."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._lock = threading.Lock()
        self._encoder = fmt.Encoder()
        self.calls: collections.deque = collections.deque()
        self.written_calls = 0
        self.closed = False
        self._blob_ids: dict[bytes, int] = {}
        self.blob_bytes = 0
        self._write(fmt.file_header() + self._encoder.packed(fmt.HEADER, header, compress=False))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def blob(self, data: Any) -> int:
        """Store a payload (once per distinct content) and return its blob id."""
        view = memoryview(data)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        key = hashlib.blake2b(view, digest_size=16).digest()
        with self._lock:
            blob_id = self._blob_ids.get(key)
            if blob_id is None and not self.closed:
                blob_id = self._blob_ids[key] = len(self._blob_ids) + 1
                self.blob_bytes += view.nbytes
                for part in self._encoder.blob_parts(blob_id, view):
                    self._write(part)
        return blob_id or 0

    def flush(self) -> None:
        """Write the queued call records as one CALLS block."""
        with self._lock:
            if self.closed:
                return
            self._flush_locked()

    def _flush_locked(self) -> None:
        queue = self.calls
        n = len(queue)
        if not n:
            return
        pop = queue.popleft
        records = []
        for _ in range(n):
            rec = pop()
            if rec[0] == LAUNCH and rec[-1]:
                rec = rec[:-1] + ([_encode_arg(a) for a in rec[-1]],)
            records.append(rec)
        self._write(self._encoder.packed(fmt.CALLS, records))
        self.written_calls += n

    def finish(self, clean: bool = True) -> None:
        """Write what is queued and the END block, and close the file (idempotent)."""
        with self._lock:
            if self.closed:
                return
            try:
                self._flush_locked()
                self._write(self._encoder.packed(fmt.END, {
                    "calls": self.written_calls, "t_end": _now(), "clean": clean,
                    "blobs": len(self._blob_ids), "blob_bytes": self.blob_bytes},
                    compress=False))
            finally:
                self.closed = True
                os.close(self._fd)


def _encode_arg(arg: Any) -> Any:
    """One launch argument as its tagged list (see docs/trace-format.md)."""
    kind = type(arg)
    if kind is Buffer:
        return [fmt.ARG_BUFFER, arg.id, arg.nbytes, 0]
    if kind is BufferArg and type(arg.buffer) is Buffer:
        return [fmt.ARG_BUFFER, arg.buffer.id, arg.buffer.nbytes, arg.offset]
    if kind is Scalar:
        return [fmt.ARG_SCALAR, arg.value, arg.dtype]
    if isinstance(arg, np.generic) and arg.dtype.kind in "biuf":
        return [fmt.ARG_SCALAR, arg.item(), arg.dtype.name]
    if kind is ArrayArg and type(arg.buffer) is Buffer:
        return [fmt.ARG_ARRAY, arg.buffer.id, arg.buffer.nbytes, arg.dtype, list(arg.shape),
                arg.offset, list(arg.strides) if arg.strides is not None else None]
    if isinstance(arg, (bool, int, float, str, type(None))):
        return arg           # a bare value: the call failed at once on it, and will again
    return {fmt.UNRECORDABLE: fmt._short_repr(arg)}


def error_record(exc: BaseException) -> list:
    """[type, code, message, failed call, failed seq] of an exception a call raised."""
    message = getattr(exc, "message", None)
    if not isinstance(message, str):
        message = str(exc)
    return [type(exc).__name__, getattr(exc, "code", None), message,
            getattr(exc, "call", None), getattr(exc, "seq", None)]


def _hid(value: Any) -> Any:
    """A handle's id; anything else marked unrecordable (only in calls that failed)."""
    if isinstance(value, _HANDLES):
        return value.id
    return {fmt.UNRECORDABLE: fmt._short_repr(value)}


def _sid(stream: Any) -> Any:
    return None if stream is None else _hid(stream)


def _bn(buf: Any) -> int | None:
    return buf.nbytes if isinstance(buf, Buffer) else None


def _view(data: Any) -> memoryview:
    view = memoryview(data)
    return view if view.ndim == 1 and view.format == "B" else view.cast("B")


_claimed: set[str] = set()
_claim_lock = threading.Lock()


def claim_path(path: str | os.PathLike) -> Path:
    """The file a new recording in this process writes for `path`: `path` itself the first
    time, then `stem.2.harptrace`, `stem.3.harptrace`... so two sessions never share a file.
    A directory (or a path ending in a separator) gets `<pid>-<n>.harptrace` inside it."""
    raw = os.fspath(path)
    p = Path(raw).expanduser()
    with _claim_lock:
        if raw.endswith(os.sep) or p.is_dir():
            p.mkdir(parents=True, exist_ok=True)
            for n in itertools.count(1):
                candidate = p / f"{os.getpid()}-{n}{SUFFIX}"
                if str(candidate) not in _claimed and not candidate.exists():
                    break
        else:
            candidate = p
            suffix = p.suffix or SUFFIX
            stem = p.name[:-len(p.suffix)] if p.suffix else p.name
            for n in itertools.count(2):
                if str(candidate) not in _claimed:
                    break
                candidate = p.with_name(f"{stem}.{n}{suffix}")
            if candidate != p:
                log.info("trace %s is taken by another session of this process; writing %s",
                         p, candidate)
        _claimed.add(str(candidate))
    return candidate


class TraceRecorder(Device):
    """Wraps `device`, records every call into the trace at `path`, and behaves exactly like it.

    `payloads=True` also stores the bytes of every write (compressed, each distinct payload
    once), which replay needs to check read digests. Module images are always stored.
    `read_digests=False` skips hashing read data. `meta` goes into the trace header.
    """

    def __init__(self, device: Device, path: str | os.PathLike, *, payloads: bool = False,
                 read_digests: bool = True, meta: dict[str, Any] | None = None) -> None:
        self._inner = device
        self._payloads = bool(payloads)
        self._digests = bool(read_digests)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            info = device.info.to_dict()
        except Exception as exc:  # the facts are nice to have; recording must still start
            info = {"error": str(exc)}
        from harp import __version__
        header = {
            "format": "harp-trace", "version": [fmt.VERSION_MAJOR, fmt.VERSION_MINOR],
            "clock": "monotonic_ns", "origin_ns": _now(), "created_unix_ns": time.time_ns(),
            "device": info, "payloads": self._payloads,
            "read_digest": fmt.READ_DIGEST if self._digests else None,
            "host": socket.gethostname(), "pid": os.getpid(), "harp_version": __version__,
            "python": platform.python_version(), "meta": dict(meta or {}),
        }
        self._writer = TraceWriter(self.path, header)
        self._append = self._writer.calls.append
        self._count = itertools.count(1)
        self._deadline = _now() + FLUSH_NS
        self._closed = False
        self._finalizer = weakref.finalize(self, self._writer.finish, False)

    # -- recording machinery -------------------------------------------------------
    @property
    def inner(self) -> Device:
        """The device this recorder wraps."""
        return self._inner

    def __getattr__(self, name: str) -> Any:
        # Extras of the wrapped device (a remote session's id, a backend's counters).
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._inner, name)

    def flush(self) -> None:
        """Write every call recorded so far to the file."""
        self._writer.flush()
        self._deadline = _now() + FLUSH_NS

    def _tick(self, seq: int, t1: int) -> None:
        if t1 > self._deadline or not seq & (FLUSH_CALLS - 1):
            self.flush()

    def _failed(self, op: int, seq: int, t0: int, exc: BaseException, *fields: Any) -> None:
        self._append((op, seq, t0, _now(), error_record(exc), *fields))

    def _synced(self, rec: tuple) -> None:
        self._append(rec)
        self.flush()

    # -- facts ---------------------------------------------------------------------
    @property
    def info(self) -> DeviceInfo:
        return self._inner.info

    def mem_info(self) -> MemInfo:
        seq, t0 = next(self._count), _now()
        try:
            mi = self._inner.mem_info()
        except Exception as exc:
            self._failed(MEM_INFO, seq, t0, exc, None, None)
            self.flush()
            raise
        self._synced((MEM_INFO, seq, t0, _now(), None, mi.free, mi.total))
        return mi

    # -- memory --------------------------------------------------------------------
    def alloc(self, nbytes: int) -> Buffer:
        seq, t0 = next(self._count), _now()
        try:
            buf = self._inner.alloc(nbytes)
        except Exception as exc:
            self._failed(ALLOC, seq, t0, exc, nbytes, None)
            raise
        t1 = _now()
        self._append((ALLOC, seq, t0, t1, None, buf.nbytes, buf.id))
        self._tick(seq, t1)
        return buf

    def free(self, buf: Buffer) -> None:
        seq, t0 = next(self._count), _now()
        try:
            self._inner.free(buf)
        except Exception as exc:
            self._failed(FREE, seq, t0, exc, _hid(buf), _bn(buf))
            raise
        t1 = _now()
        self._append((FREE, seq, t0, t1, None, buf.id, buf.nbytes))
        self._tick(seq, t1)

    def write(self, buf: Buffer, offset: int, data: Any, stream: Stream | None = None) -> None:
        seq, t0 = next(self._count), _now()
        try:
            self._inner.write(buf, offset, data, stream)
        except Exception as exc:
            try:
                nbytes = memoryview(data).nbytes
            except TypeError:
                nbytes = None
            self._failed(WRITE, seq, t0, exc, _hid(buf), _bn(buf), offset, nbytes, _sid(stream),
                         None)
            raise
        t1 = _now()     # before the payload is stored: the trace times the device, not us
        if self._payloads:
            view = _view(data)
            nbytes, blob = view.nbytes, self._writer.blob(view)
        else:
            nbytes, blob = memoryview(data).nbytes, None
        self._append((WRITE, seq, t0, t1, None, buf.id, buf.nbytes, offset, nbytes,
                      None if stream is None else stream.id, blob))
        self._tick(seq, t1)

    def read(self, buf: Buffer, offset: int, nbytes: int, out: Any = None,
             stream: Stream | None = None) -> Any:
        seq, t0 = next(self._count), _now()
        try:
            result = self._inner.read(buf, offset, nbytes, out, stream)
        except Exception as exc:
            self._failed(READ, seq, t0, exc, _hid(buf), _bn(buf), offset, nbytes, _sid(stream),
                         None)
            self.flush()
            raise
        t1 = _now()
        digest = None
        if self._digests:
            digest = hashlib.blake2b(_view(result)[:nbytes], digest_size=16).digest()
        self._synced((READ, seq, t0, t1, None, buf.id, buf.nbytes, offset, nbytes,
                      None if stream is None else stream.id, digest))
        return result

    def copy(self, dst: Buffer, dst_offset: int, src: Buffer, src_offset: int, nbytes: int,
             stream: Stream | None = None) -> None:
        seq, t0 = next(self._count), _now()
        try:
            self._inner.copy(dst, dst_offset, src, src_offset, nbytes, stream)
        except Exception as exc:
            self._failed(COPY, seq, t0, exc, _hid(dst), _bn(dst), dst_offset, _hid(src), _bn(src),
                         src_offset, nbytes, _sid(stream))
            raise
        t1 = _now()
        self._append((COPY, seq, t0, t1, None, dst.id, dst.nbytes, dst_offset, src.id,
                      src.nbytes, src_offset, nbytes, None if stream is None else stream.id))
        self._tick(seq, t1)

    def fill(self, buf: Buffer, value: int, offset: int = 0, nbytes: int | None = None,
             stream: Stream | None = None) -> None:
        seq, t0 = next(self._count), _now()
        try:
            self._inner.fill(buf, value, offset, nbytes, stream)
        except Exception as exc:
            self._failed(FILL, seq, t0, exc, _hid(buf), _bn(buf), value, offset, nbytes,
                         _sid(stream))
            raise
        t1 = _now()
        self._append((FILL, seq, t0, t1, None, buf.id, buf.nbytes, value, offset, nbytes,
                      None if stream is None else stream.id))
        self._tick(seq, t1)

    # -- code ----------------------------------------------------------------------
    def load_module(self, image: bytes | str, format: str) -> Module:
        seq, t0 = next(self._count), _now()
        try:
            module = self._inner.load_module(image, format)
        except Exception as exc:
            self._failed(LOAD_MODULE, seq, t0, exc, format, None, isinstance(image, str), None)
            raise
        t1 = _now()
        is_str = isinstance(image, str)
        blob = self._writer.blob(image.encode("utf-8") if is_str else image)
        self._append((LOAD_MODULE, seq, t0, t1, None, module.format, blob, is_str, module.id))
        self._tick(seq, t1)
        return module

    def function(self, module: Module, name: str) -> Function:
        seq, t0 = next(self._count), _now()
        try:
            fn = self._inner.function(module, name)
        except Exception as exc:
            self._failed(FUNCTION, seq, t0, exc, _hid(module), name, None)
            raise
        t1 = _now()
        self._append((FUNCTION, seq, t0, t1, None, module.id, fn.name, fn.id))
        self._tick(seq, t1)
        return fn

    def launch(self, fn: Function, grid: Dims, block: Dims, args: Sequence[Any],
               shared_mem: int = 0, stream: Stream | None = None) -> None:
        seq, t0 = next(self._count), _now()
        if type(args) is not list and type(args) is not tuple and \
                not isinstance(args, (str, bytes)) and hasattr(args, "__iter__"):
            args = list(args)        # a one-shot iterable: the inner device would consume it
        try:
            self._inner.launch(fn, grid, block, args, shared_mem, stream)
        except Exception as exc:
            self._failed(LAUNCH, seq, t0, exc, _hid(fn), _dims(grid), _dims(block), shared_mem,
                         _sid(stream), _safe_args(args))
            raise
        t1 = _now()
        self._append((LAUNCH, seq, t0, t1, None, fn.id,
                      grid if type(grid) is int else tuple(grid),
                      block if type(block) is int else tuple(block), shared_mem,
                      None if stream is None else stream.id, tuple(args)))
        self._tick(seq, t1)

    # -- order ---------------------------------------------------------------------
    def stream(self) -> Stream:
        seq, t0 = next(self._count), _now()
        try:
            stream = self._inner.stream()
        except Exception as exc:
            self._failed(STREAM, seq, t0, exc, None)
            raise
        t1 = _now()
        self._append((STREAM, seq, t0, t1, None, stream.id))
        self._tick(seq, t1)
        return stream

    def event(self) -> Event:
        seq, t0 = next(self._count), _now()
        try:
            event = self._inner.event()
        except Exception as exc:
            self._failed(EVENT, seq, t0, exc, None)
            raise
        t1 = _now()
        self._append((EVENT, seq, t0, t1, None, event.id))
        self._tick(seq, t1)
        return event

    def record(self, event: Event, stream: Stream | None = None) -> None:
        seq, t0 = next(self._count), _now()
        try:
            self._inner.record(event, stream)
        except Exception as exc:
            self._failed(RECORD, seq, t0, exc, _hid(event), _sid(stream))
            raise
        t1 = _now()
        self._append((RECORD, seq, t0, t1, None, event.id,
                      None if stream is None else stream.id))
        self._tick(seq, t1)

    def wait(self, stream: Stream, event: Event) -> None:
        seq, t0 = next(self._count), _now()
        try:
            self._inner.wait(stream, event)
        except Exception as exc:
            self._failed(WAIT, seq, t0, exc, _sid(stream), _hid(event))
            raise
        t1 = _now()
        self._append((WAIT, seq, t0, t1, None, None if stream is None else stream.id, event.id))
        self._tick(seq, t1)

    def synchronize(self, stream: Stream | None = None) -> None:
        seq, t0 = next(self._count), _now()
        try:
            self._inner.synchronize(stream)
        except Exception as exc:
            self._failed(SYNCHRONIZE, seq, t0, exc, _sid(stream))
            self.flush()
            raise
        self._synced((SYNCHRONIZE, seq, t0, _now(), None, None if stream is None else stream.id))

    def elapsed(self, start: Event, end: Event) -> float:
        seq, t0 = next(self._count), _now()
        try:
            ms = self._inner.elapsed(start, end)
        except Exception as exc:
            self._failed(ELAPSED, seq, t0, exc, _hid(start), _hid(end), None)
            self.flush()
            raise
        self._synced((ELAPSED, seq, t0, _now(), None, start.id, end.id, ms))
        return ms

    # -- lifetime ------------------------------------------------------------------
    def close(self) -> None:
        """Close the inner device, then write the CLOSE record and the END block."""
        if self._closed:
            self._inner.close()
            return
        self._closed = True
        seq, t0 = next(self._count), _now()
        error = None
        try:
            self._inner.close()
        except Exception as exc:
            error = error_record(exc)
            raise
        finally:
            self._append((CLOSE, seq, t0, _now(), error))
            self._finalizer.detach()
            self._writer.finish(clean=True)


def _dims(dims: Any) -> Any:
    if isinstance(dims, (list, tuple)):
        return [d if isinstance(d, (int, float, np.integer)) else fmt._short_repr(d)
                for d in dims]
    return dims


def _safe_args(args: Any) -> Any:
    try:
        return tuple(args)
    except TypeError:
        return {fmt.UNRECORDABLE: fmt._short_repr(args)}


def record_to(device: Device, path: str | os.PathLike, *, payloads: bool | None = None,
              read_digests: bool = True, meta: dict[str, Any] | None = None) -> TraceRecorder:
    """Wrap `device` in a recorder writing `path` (see `claim_path` for repeated paths).

    `payloads=None` takes `HARP_TRACE_PAYLOADS` (1/true/yes to store write payloads).
    """
    if payloads is None:
        payloads = os.environ.get("HARP_TRACE_PAYLOADS", "").strip().lower() in ("1", "true",
                                                                                 "yes", "on")
    return TraceRecorder(device, claim_path(path), payloads=payloads, read_digests=read_digests,
                         meta=meta)


def session_recorder(device: Device, trace_dir: str | os.PathLike, session_id: str,
                     **opts: Any) -> TraceRecorder:
    """For a pool server's `--trace-dir`: wrap a session's backend device so that it records
    into `trace_dir/<session_id>.harptrace`. Options as `TraceRecorder` (`payloads`, ...).

    The trace is the server's view of the session: the backend's calls (a chunked client
    write is one write per chunk) timed on the server.
    """
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in session_id) or "session"
    meta = {"session": session_id, "recorded_by": "pool server", **opts.pop("meta", {})}
    opts.setdefault("payloads", False)
    return TraceRecorder(device, Path(trace_dir) / f"{safe}{SUFFIX}", meta=meta, **opts)


__all__ = ["TraceRecorder", "TraceWriter", "record_to", "session_recorder", "claim_path",
           "error_record", "FLUSH_CALLS", "SUFFIX"]
