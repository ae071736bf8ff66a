"""`TraceRecorder`: a `Device` that passes every call to another one and records it.

The hot path (an asynchronous call such as `launch`) takes two clock readings
and adds one record's fields to a queue, nothing more; `launch`, the call
programs make most, is a closure of its own per recorder (`hotpath.py`) that
stores its arguments as passed, encoded only when their block is packed
(`argcodec.py`). Encoding (msgpack),
compression (zstandard) and the write happen in batches: at every sync call,
before it returns, in the caller's thread; when a launch finds `BLOCK_FIELDS`
fields queued, in its thread; between those every `FLUSH_INTERVAL` seconds in
one background thread shared by all recorders (zstandard and the write release
the GIL); and on close. Each batch is one
framed block, so a crash loses at most the calls of the last `FLUSH_INTERVAL`
since the last sync call, plus a block torn mid-write (see docs/trace-format.md).
A failing trace file (a full disk) is logged and recording stops; the program's
calls are never affected.

The recorder changes nothing the program sees: the same results, the same
exceptions (the very objects the inner device raised), the same call numbers.
"""
from __future__ import annotations

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

import msgpack

from harp.device import Device, Dims
from harp.types import Buffer, DeviceInfo, Event, Function, MemInfo, Module, Stream

from . import format as fmt
from .argcodec import BlockValues, handle_id as _hid
from .hotpath import recorded_launch
from .format import (ALLOC, CLOSE, COPY, ELAPSED, EVENT, FILL, FREE, FUNCTION,
                     LOAD_MODULE, MEM_INFO, READ, RECORD, STREAM, SYNCHRONIZE, WAIT, WRITE)

log = logging.getLogger("harp.trace")

#: Seconds between background writes of the calls queued since the last sync call.
FLUSH_INTERVAL = 0.05
#: Queued record fields (about a thousand launches) at which a launch writes the block
#: itself, in the caller's thread, rather than leave 50 ms worth to the background thread:
#: measured cheaper on 2 cores (docs/trace-overhead.md).
BLOCK_FIELDS = 11 * 1024
#: File suffix of traces.
SUFFIX = ".harptrace"

_now = time.monotonic_ns


class TraceWriter:
    """The file side of a recording: queued call records, blobs, blocks. Thread-safe.

    Records are queued *flat*: each call extends one list with its fields (one C call, atomic
    under the GIL), and a block is that list's prefix packed as one msgpack array (a quarter
    faster to pack than an array of small arrays, and no container object per call). A
    launch's fields are stored as passed (its argument tuple, a `Stream`), and encoded by
    the CALLS blocks' msgpack fallback (`argcodec.BlockValues`) when the block is packed.
    """

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._lock = threading.Lock()
        self._encoder = fmt.Encoder()
        self._values = BlockValues()
        self._calls_encoder = fmt.Encoder(default=self._values.default)
        self.calls: list = []
        self.closed = False
        self._blob_ids: dict[bytes, int] = {}
        self.blob_bytes = 0
        self.failed: BaseException | None = None
        self._write(fmt.file_header() + self._encoder.packed(fmt.HEADER, header, compress=False))
        if self.failed is not None:
            os.close(self._fd)
            raise self.failed
        _flusher.add(self)

    def _write(self, data: bytes) -> None:
        if self.failed is not None:
            return
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            self.failed = exc
            self.calls.clear()
            log.warning("trace %s: cannot write (%s); recording stops, the device carries on",
                        self.path, exc)

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
            if not self.closed:
                self._flush_locked()

    def _flush_locked(self) -> None:
        queue = self.calls
        n = len(queue)         # a record boundary: each record is added by one extend()
        if not n:
            return
        if self.failed is not None:
            del queue[:n]
            return
        batch = queue[:n]
        del queue[:n]          # records added meanwhile by other threads stay, after n
        try:
            try:
                block = self._calls_encoder.packed(fmt.CALLS, batch)
            except Exception:  # a value msgpack refuses (an int past 64 bits): mark it
                default = self._values.default
                block = self._calls_encoder.packed(fmt.CALLS,
                                                   [_packable(v, default) for v in batch])
        finally:
            self._values.reset()
        self._write(block)

    def finish(self, calls: int, clean: bool = True) -> None:
        """Write what is queued and the END block, and close the file (idempotent)."""
        with self._lock:
            if self.closed:
                return
            try:
                self._flush_locked()
                self._write(self._encoder.packed(fmt.END, {
                    "calls": calls, "t_end": _now(), "clean": clean,
                    "blobs": len(self._blob_ids), "blob_bytes": self.blob_bytes},
                    compress=False))
            finally:
                self.closed = True
                os.close(self._fd)


class _Flusher:
    """One daemon thread that writes every live recorder's queued calls each FLUSH_INTERVAL."""

    def __init__(self) -> None:
        self._writers: weakref.WeakSet[TraceWriter] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._pid = 0

    def add(self, writer: TraceWriter) -> None:
        with self._lock:
            self._writers.add(writer)
            if self._pid != os.getpid():       # first use, or a forked child: no thread yet
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="harp-trace-flusher",
                                 daemon=True).start()

    def _run(self) -> None:
        while True:
            time.sleep(FLUSH_INTERVAL)
            for writer in list(self._writers):
                if writer.calls and not writer.closed:
                    try:
                        writer.flush()
                    except Exception:  # never let one trace stop the others
                        log.exception("trace %s: background write failed", writer.path)


_flusher = _Flusher()


def _packable(value: Any, default: Any) -> Any:
    try:
        msgpack.packb(value, use_bin_type=True, strict_types=True, default=default)
        return value
    except Exception:
        return {fmt.UNRECORDABLE: fmt._short_repr(value)}


def error_record(exc: BaseException) -> list:
    """[type, code, message, failed call, failed seq] of an exception a call raised."""
    message = getattr(exc, "message", None)
    if not isinstance(message, str):
        message = str(exc)
    return [type(exc).__name__, getattr(exc, "code", None), message,
            getattr(exc, "call", None), getattr(exc, "seq", None)]


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

    Wrap a session from its first call: the recorder counts calls to know each one's
    sequence number, as the device numbers them.

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
        self._extend = self._writer.calls.extend
        self._count = itertools.count(1)
        self._closed = False
        self.launch = recorded_launch(device.launch, self._writer.calls, self._count,
                                      self._failed, self._writer.flush, BLOCK_FIELDS)
        self._finalizer = weakref.finalize(self, _finish_abandoned, self._writer, self._count)

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

    def _failed(self, op: int, seq: int, t0: int, exc: BaseException, *fields: Any) -> None:
        self._extend((op, seq, t0, _now(), error_record(exc), *fields))

    def _synced(self, rec: tuple) -> None:
        self._extend(rec)
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
        self._extend((ALLOC, seq, t0, _now(), None, buf.nbytes, buf.id))
        return buf

    def free(self, buf: Buffer) -> None:
        seq, t0 = next(self._count), _now()
        try:
            self._inner.free(buf)
        except Exception as exc:
            self._failed(FREE, seq, t0, exc, _hid(buf), _bn(buf))
            raise
        self._extend((FREE, seq, t0, _now(), None, buf.id, buf.nbytes))

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
        self._extend((WRITE, seq, t0, t1, None, buf.id, buf.nbytes, offset, nbytes,
                      None if stream is None else stream.id, blob))

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
        self._extend((COPY, seq, t0, _now(), None, dst.id, dst.nbytes, dst_offset, src.id,
                      src.nbytes, src_offset, nbytes, None if stream is None else stream.id))

    def fill(self, buf: Buffer, value: int, offset: int = 0, nbytes: int | None = None,
             stream: Stream | None = None) -> None:
        seq, t0 = next(self._count), _now()
        try:
            self._inner.fill(buf, value, offset, nbytes, stream)
        except Exception as exc:
            self._failed(FILL, seq, t0, exc, _hid(buf), _bn(buf), value, offset, nbytes,
                         _sid(stream))
            raise
        self._extend((FILL, seq, t0, _now(), None, buf.id, buf.nbytes, value, offset, nbytes,
                      None if stream is None else stream.id))

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
        self._extend((LOAD_MODULE, seq, t0, t1, None, module.format, blob, is_str, module.id))
        return module

    def function(self, module: Module, name: str) -> Function:
        seq, t0 = next(self._count), _now()
        try:
            fn = self._inner.function(module, name)
        except Exception as exc:
            self._failed(FUNCTION, seq, t0, exc, _hid(module), name, None)
            raise
        self._extend((FUNCTION, seq, t0, _now(), None, module.id, fn.name, fn.id))
        return fn

    def launch(self, fn: Function, grid: Dims, block: Dims, args: Sequence[Any],
               shared_mem: int = 0, stream: Stream | None = None) -> None:
        # Only reached through the class (TraceRecorder.launch(rec, ...)): each instance has
        # its own `launch`, the closure `recorded_launch` made in __init__.
        self.__dict__["launch"](fn, grid, block, args, shared_mem, stream)

    # -- order ---------------------------------------------------------------------
    def stream(self) -> Stream:
        seq, t0 = next(self._count), _now()
        try:
            stream = self._inner.stream()
        except Exception as exc:
            self._failed(STREAM, seq, t0, exc, None)
            raise
        self._extend((STREAM, seq, t0, _now(), None, stream.id))
        return stream

    def event(self) -> Event:
        seq, t0 = next(self._count), _now()
        try:
            event = self._inner.event()
        except Exception as exc:
            self._failed(EVENT, seq, t0, exc, None)
            raise
        self._extend((EVENT, seq, t0, _now(), None, event.id))
        return event

    def record(self, event: Event, stream: Stream | None = None) -> None:
        seq, t0 = next(self._count), _now()
        try:
            self._inner.record(event, stream)
        except Exception as exc:
            self._failed(RECORD, seq, t0, exc, _hid(event), _sid(stream))
            raise
        self._extend((RECORD, seq, t0, _now(), None, event.id,
                      None if stream is None else stream.id))

    def wait(self, stream: Stream, event: Event) -> None:
        seq, t0 = next(self._count), _now()
        try:
            self._inner.wait(stream, event)
        except Exception as exc:
            self._failed(WAIT, seq, t0, exc, _sid(stream), _hid(event))
            raise
        self._extend((WAIT, seq, t0, _now(), None, None if stream is None else stream.id, event.id))

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
            self._extend((CLOSE, seq, t0, _now(), error))
            self._finalizer.detach()
            self._writer.finish(seq, clean=True)


def _finish_abandoned(writer: TraceWriter, count: Any) -> None:
    """A recorder collected (or the process exiting) without close: write what it has."""
    writer.finish(next(count) - 1, clean=False)


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


class SessionTracer:
    """`session_recorder` for one trace directory, as a value that pickles, so a pool
    server can hand it to its worker processes (`PoolServer(wrap_device=...)`)."""

    def __init__(self, trace_dir: str | os.PathLike, **opts: Any) -> None:
        self.trace_dir = str(trace_dir)
        self.opts = opts

    def __call__(self, device: Device, session_id: str) -> TraceRecorder:
        return session_recorder(device, self.trace_dir, session_id, **dict(self.opts))


__all__ = ["TraceRecorder", "TraceWriter", "record_to", "session_recorder", "SessionTracer",
           "claim_path",
           "error_record", "FLUSH_INTERVAL", "BLOCK_FIELDS", "SUFFIX"]
