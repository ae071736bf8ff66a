"""`RemoteDevice`: the `Device` interface over one gRPC stream to a pool server.

Asynchronous calls are encoded as records and queued; they leave in batches
when a batch fills or at the next sync call, which waits for its reply. The
client picks every handle id itself, so creating a buffer or a stream never
waits for the network. Argument checks are the same functions the local
backends use, so a bad argument fails the same way local and remote.
"""
from __future__ import annotations

import os
import queue
import socket
import threading
from typing import Any, Iterator, Sequence

import grpc
import msgpack

from harp import wire
from harp.device import Device, Dims
from harp.errors import HarpError, ProtocolError, TransportError
from harp.frontend import (HandleIds, as_bytes_view, check_buffer, check_copy, check_count,
                           check_dims, check_event, check_fill, check_function, check_image,
                           check_module, check_range, check_stream, normalize_args, out_view)
from harp.proto import session_pb2 as pb
from harp.transport import error_from_rpc
from harp.types import Buffer, DeviceInfo, Event, Function, MemInfo, Module, Stream



class _BulkJob:
    """A write's payload waiting to be cut into chunks by the sending thread."""

    __slots__ = ("view", "chunk", "done")

    def __init__(self, view: memoryview, chunk: int) -> None:
        self.view, self.chunk, self.done = view, chunk, threading.Event()


class RemoteDevice(Device):
    """A session on a pool server's device. Safe to share between threads (calls are serialized)."""

    def __init__(self, channel: grpc.Channel, *, device_index: int = 0, token: str = "",
                 client_name: str = "", connect_timeout: float = 10.0) -> None:
        self._channel = channel
        self._ids = HandleIds()
        self._seq = 0
        self._batch: list[list] = []
        self._batch_bytes = 0
        self._lock = threading.RLock()
        self._broken: HarpError | None = None
        self._closed = False
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        #: Hooks run at close, and a way to explain a broken session (set by lease connects).
        self.on_close: list[Any] = []
        self.explain: Any = None
        open_stream = channel.stream_stream(wire.METHOD)
        self._call = open_stream(self._frames())
        self._responses = iter(self._call)
        request = pb.HandshakeRequest(
            versions=pb.VersionRange(min=wire.PROTOCOL_MIN, max=wire.PROTOCOL_MAX),
            device_index=device_index, token=token,
            client_name=client_name or f"pid {os.getpid()}", client_host=socket.gethostname())
        self._requests.put(request.SerializeToString())
        reply = pb.HandshakeReply()
        # A server that accepts the connection but never answers must not hang us.
        watchdog = threading.Timer(connect_timeout, self._call.cancel)
        watchdog.start()
        try:
            reply.ParseFromString(self._next_frame("handshake"))
        except HarpError:
            self._shutdown()
            raise
        finally:
            watchdog.cancel()
        if reply.HasField("error"):
            self._shutdown()
            raise wire.error_from_proto(reply.error.SerializeToString())
        self.session_id = reply.session_id
        self.server_name = reply.server_name
        self.protocol_version = reply.version
        self._info = wire.facts_from_proto(reply.device)

    # -- transport -----------------------------------------------------------------
    def _frames(self) -> Iterator[bytes]:
        """The request stream gRPC's sending thread pulls from.

        A bulk write is queued as a job and cut into chunks here, in the sending
        thread, one chunk per pull: gRPC pulls the next one only when flow
        control lets it send, so the copies stay one chunk ahead of the wire and
        no thread hands chunks to another.
        """
        get = self._requests.get
        while True:
            item = get()
            if item is None:
                return
            if type(item) is _BulkJob:
                view, chunk = item.view, item.chunk
                for pos in range(0, view.nbytes, chunk):
                    yield view[pos:pos + chunk].tobytes()
                item.done.set()
                continue
            yield item

    def _next_frame(self, what: str) -> bytes:
        try:
            return next(self._responses)
        except StopIteration:
            self._broken = TransportError(f"{what}: the server ended the session")
        except grpc.RpcError as exc:
            self._broken = error_from_rpc(exc, what)
            if exc.code() == grpc.StatusCode.CANCELLED and what == "handshake":
                self._broken = TransportError("handshake: no answer from the server in time")
        if self.explain is not None:
            self._broken = self.explain(self._broken)
        raise self._broken

    def _send(self, frame: bytes) -> None:
        if self._broken is not None:
            raise self._broken
        self._requests.put(frame)

    def _send_bulk(self, view: memoryview) -> None:
        """Send a write's payload as chunks; return once every chunk has been copied out."""
        job = _BulkJob(view, wire.CHUNK_SIZE)
        self._send(job)  # type: ignore[arg-type]
        while not job.done.wait(1.0):
            if not self._call.is_active():
                self._broken = TransportError("the connection to the server is gone")
                raise self._broken

    def _flush(self) -> None:
        if self._batch:
            frame = wire.pack(self._batch)
            self._batch, self._batch_bytes = [], 0
            self._send(frame)

    def _issue(self, record: list, payload: int = 0) -> None:
        """Queue an async call; the batch leaves when it is full (calls or bytes)."""
        if payload and self._batch_bytes + payload > wire.BATCH_BYTES:
            self._flush()                       # keep every frame under the frame limit
        self._batch.append(record)
        self._batch_bytes += payload
        if len(self._batch) >= wire.BATCH_CALLS or self._batch_bytes >= wire.BATCH_BYTES:
            self._flush()

    def _next(self) -> int:
        if self._closed:
            raise HarpError("the device session is closed")
        self._seq += 1
        return self._seq

    def _sync(self, record: list) -> Any:
        """Send `record` with the pending batch and return its reply's result."""
        if self._broken is not None:
            raise self._broken
        self._batch.append(record)
        self._flush()
        frame = self._next_frame(wire.SCHEMA[record[0]][0])
        try:
            seq, error, result = msgpack.unpackb(frame, raw=False)
        except Exception:
            self._broken = ProtocolError("the server sent a malformed reply")
            raise self._broken from None
        if error is not None:
            err = wire.error_from_proto(error)
            if seq == 0:  # the server ended the session over a protocol error
                self._broken = err
            raise err
        if seq != record[1]:
            self._broken = ProtocolError(f"reply for call #{seq} while waiting for #{record[1]}")
            raise self._broken
        return result

    # -- facts -----------------------------------------------------------------------
    @property
    def info(self) -> DeviceInfo:
        return self._info

    def mem_info(self) -> MemInfo:
        with self._lock:
            free, total = self._sync([wire.MEM_INFO, self._next()])
        return MemInfo(free=free, total=total)

    # -- memory ----------------------------------------------------------------------
    def alloc(self, nbytes: int) -> Buffer:
        with self._lock:
            seq = self._next()
            buf = Buffer(self._ids.new(), check_count(nbytes, "nbytes"))
            self._issue([wire.ALLOC, seq, buf.id, buf.nbytes])
        return buf

    def free(self, buf: Buffer) -> None:
        with self._lock:
            seq = self._next()
            self._issue([wire.FREE, seq, check_buffer(buf).id])

    def write(self, buf: Buffer, offset: int, data: Any, stream: Stream | None = None) -> None:
        with self._lock:
            seq = self._next()
            view = as_bytes_view(data)
            offset, nbytes = check_range(buf, offset, view.nbytes, "write")
            sid = check_stream(stream).id
            if nbytes <= wire.INLINE_LIMIT:
                self._issue([wire.WRITE, seq, buf.id, offset, sid, view.tobytes()], nbytes)
                return
            self._batch.append([wire.WRITE_CHUNKED, seq, buf.id, offset, sid, nbytes])
            self._flush()
            self._send_bulk(view)

    def read(self, buf: Buffer, offset: int, nbytes: int, out: Any = None,
             stream: Stream | None = None) -> Any:
        with self._lock:
            seq = self._next()
            offset, nbytes = check_range(buf, offset, nbytes, "read")
            sid = check_stream(stream).id
            dst = None if out is None else out_view(out, nbytes)
            result = self._sync([wire.READ, seq, buf.id, offset, nbytes, sid])
            if len(result) == 2:                 # a small read: the data is in the reply
                if len(result[1]) != nbytes:
                    self._broken = ProtocolError("the server sent a read reply of the wrong size")
                    raise self._broken
                if dst is None:
                    return result[1]
                dst[:] = result[1]
                return out
            chunks, pos = [], 0
            while pos < nbytes:
                chunk = self._next_frame("read")
                if not chunk or pos + len(chunk) > nbytes:
                    self._broken = ProtocolError("the server sent more read data than asked")
                    raise self._broken
                if dst is None:
                    chunks.append(chunk)
                else:
                    dst[pos:pos + len(chunk)] = chunk
                pos += len(chunk)
        return b"".join(chunks) if dst is None else out

    def copy(self, dst: Buffer, dst_offset: int, src: Buffer, src_offset: int, nbytes: int,
             stream: Stream | None = None) -> None:
        with self._lock:
            seq = self._next()
            dst_offset, src_offset, nbytes = check_copy(dst, dst_offset, src, src_offset, nbytes)
            self._issue([wire.COPY, seq, dst.id, dst_offset, src.id, src_offset, nbytes,
                         check_stream(stream).id])

    def fill(self, buf: Buffer, value: int, offset: int = 0, nbytes: int | None = None,
             stream: Stream | None = None) -> None:
        with self._lock:
            seq = self._next()
            value, offset, nbytes = check_fill(buf, value, offset, nbytes)
            self._issue([wire.FILL, seq, buf.id, value, offset, nbytes, check_stream(stream).id])

    # -- code ------------------------------------------------------------------------
    def load_module(self, image: bytes | str, format: str) -> Module:
        with self._lock:
            seq = self._next()
            image = check_image(image)
            if isinstance(image, str):
                image = image.encode("utf-8")
            module = Module(self._ids.new(), str(format))
            self._issue([wire.LOAD_MODULE, seq, module.id, module.format, image], len(image))
        return module

    def function(self, module: Module, name: str) -> Function:
        with self._lock:
            seq = self._next()
            fn = Function(self._ids.new(), str(name))
            self._issue([wire.FUNCTION, seq, fn.id, check_module(module).id, fn.name])
        return fn

    def launch(self, fn: Function, grid: Dims, block: Dims, args: Sequence[Any],
               shared_mem: int = 0, stream: Stream | None = None) -> None:
        with self._lock:
            seq = self._next()
            check_function(fn)
            grid3, block3 = check_dims(grid, "grid"), check_dims(block, "block")
            shared_mem = check_count(shared_mem, "shared_mem")
            encoded = [wire.encode_arg(a) for a in normalize_args(args)]
            self._issue([wire.LAUNCH, seq, fn.id, list(grid3), list(block3), shared_mem,
                         check_stream(stream).id, encoded])

    # -- order -----------------------------------------------------------------------
    def stream(self) -> Stream:
        with self._lock:
            seq = self._next()
            stream = Stream(self._ids.new())
            self._issue([wire.STREAM, seq, stream.id])
        return stream

    def event(self) -> Event:
        with self._lock:
            seq = self._next()
            event = Event(self._ids.new())
            self._issue([wire.EVENT, seq, event.id])
        return event

    def record(self, event: Event, stream: Stream | None = None) -> None:
        with self._lock:
            seq = self._next()
            self._issue([wire.RECORD, seq, check_event(event).id, check_stream(stream).id])

    def wait(self, stream: Stream, event: Event) -> None:
        with self._lock:
            seq = self._next()
            self._issue([wire.WAIT, seq, check_stream(stream).id, check_event(event).id])

    def synchronize(self, stream: Stream | None = None) -> None:
        with self._lock:
            seq = self._next()
            sid = None if stream is None else check_stream(stream).id
            self._sync([wire.SYNCHRONIZE, seq, sid])

    def elapsed(self, start: Event, end: Event) -> float:
        with self._lock:
            seq = self._next()
            return float(self._sync([wire.ELAPSED, seq, check_event(start).id,
                                     check_event(end).id]))

    # -- lifetime --------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                if self._broken is None:
                    self._sync([wire.CLOSE, self._next()])
            except HarpError:
                pass  # the server frees the session when the stream ends anyway
            finally:
                self._closed = True
                self._shutdown()
                for hook in self.on_close:
                    hook()

    def _shutdown(self) -> None:
        self._requests.put(None)
        self._call.cancel()
        self._channel.close()
