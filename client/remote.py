"""`RemoteDevice`: the `Device` interface over one gRPC stream to a pool server.

A thin pump around `harp.protocol.ClientProtocol`, which owns the rules
(batches, frame kinds, reply checks): asynchronous calls are encoded as
records and queued; they leave in batches when a batch fills or at the next
sync call, which waits for its reply. The client picks every handle id
itself, so creating a buffer or a stream never waits for the network.
Argument checks are the same functions the local backends use, so a bad
argument fails the same way local and remote.

A session the server ends (its lease is over, its worker died) ends with the
reason as a typed error, which this device raises from then on: in the call's
trailing metadata, or, when the server had to cancel the call, from the
server's answer to `Why` about this session. A dead link or a frozen server
is noticed by HTTP/2 keepalive pings (every 10 s, 5 s to answer, so within
about 15 s) and fails the waiting call with `TransportError`.
"""
from __future__ import annotations

import logging
import os
import queue
import socket
import threading
from typing import Any, Iterator, Sequence

import grpc

from harp import wire
from harp.device import Device, Dims
from harp.errors import HarpError, ProtocolError, TransportError
from harp.frontend import (HandleIds, as_bytes_view, check_buffer, check_copy, check_count,
                           check_dims, check_event, check_fill, check_format, check_function,
                           check_image, check_kernel_name, check_module, check_range,
                           check_stream, normalize_args, out_view)
from harp.proto import session_pb2 as pb
from harp.proto.codec import error_from_bytes, error_from_message, facts_from_proto
from harp.dataframes import FrameChannel, shut
from harp.protocol import ClientProtocol, Payload, Reply
from harp.shm import SharedWindow, pick_up
from harp.transport import error_from_rpc, recv_into_exactly
from harp.types import Buffer, DeviceInfo, Event, Function, MemInfo, Module, Stream

log = logging.getLogger("harp.client")

#: Asked, on the session's channel, why the server cancelled a session's call.
WHY_METHOD = "/harp.v1.Session/Why"
#: How long a session whose frames are on the data channel waits, once the channel failed,
#: for the server's reason to arrive as the end of the session's call.
END_WAIT_S = 5.0


class _BulkJob:
    """A write's payload waiting to be cut into chunks by the sending thread."""

    __slots__ = ("view", "chunk", "done")

    def __init__(self, view: memoryview, chunk: int) -> None:
        self.view, self.chunk, self.done = view, chunk, threading.Event()


def _take_window(offer: Any) -> SharedWindow | None:
    """The session's shared-memory window, picked up at the server's door; None (bulk data
    takes the stream) when the door cannot be reached or its window is not right."""
    try:
        fds = pick_up(offer.door, offer.ticket)
        return SharedWindow.attach(fds, offer.slot_size, offer.slots, client=True)
    except (OSError, ProtocolError) as exc:
        log.info("no shared memory from %s (%s); bulk data takes the stream", offer.door, exc)
        return None


def ended_error(exc: grpc.RpcError, what: str) -> HarpError:
    """The server's reason when it ended the session, else what the gRPC failure means."""
    try:
        trailers = exc.trailing_metadata() or ()
    except Exception:
        trailers = ()
    for key, value in trailers:
        if key == wire.ERROR_METADATA:
            return error_from_bytes(value)
    return error_from_rpc(exc, what)


class RemoteDevice(Device):
    """A session on a pool server's device. Safe to share between threads (calls are serialized)."""

    def __init__(self, channel: grpc.Channel, *, device_index: int = 0, token: str = "",
                 client_name: str = "", connect_timeout: float = 30.0,
                 target: str = "", shared_memory: bool = False,
                 open_data_channel: Any = None, frames_on_data: bool = True) -> None:
        self._channel = channel
        self._target = target
        self._ids = HandleIds()
        self._seq = 0
        self._proto = ClientProtocol(error_from_bytes)
        self._lock = threading.RLock()
        self._broken: HarpError | None = None
        self._closed = False
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._timed_out = False
        self._window: SharedWindow | None = None
        self._data: Any = None                  # the data channel's socket, when open
        self._data_offer: Any = None
        self._open_data: Any = None
        #: The session's frames, once they travel on the data channel (see `_adopt_data`).
        self._frames_on_data: FrameChannel | None = None
        self._data_opening: threading.Event | None = None   # a background open in flight
        self._data_opened: Any = None                       # its socket, not yet adopted
        self._data_lock = threading.Lock()                  # the hand-over of that socket
        self.session_id = ""
        #: Hooks run at close, and a way to explain a broken session (set by lease connects).
        self.on_close: list[Any] = []
        self.explain: Any = None
        open_stream = channel.stream_stream(wire.METHOD)
        self._call = open_stream(self._frames())
        self._responses = iter(self._call)
        request = pb.HandshakeRequest(
            versions=pb.VersionRange(min=wire.PROTOCOL_MIN, max=wire.PROTOCOL_MAX),
            device_index=device_index, token=token,
            client_name=client_name or f"pid {os.getpid()}", client_host=socket.gethostname(),
            shared_memory=shared_memory, data_channel=open_data_channel is not None)
        self._requests.put(request.SerializeToString())
        reply = pb.HandshakeReply()
        # A server that accepts the connection but never answers must not hang us.
        watchdog = threading.Timer(connect_timeout, self._handshake_timed_out)
        watchdog.daemon = True
        watchdog.start()
        try:
            reply.ParseFromString(self._next_frame("handshake"))
        except HarpError:
            self._shutdown()
            if self._timed_out:
                raise TransportError(f"handshake: no answer from the server {target} in "
                                     f"{connect_timeout:g} s") from None
            raise
        finally:
            watchdog.cancel()
        if reply.HasField("error"):
            self._shutdown()
            raise error_from_message(reply.error)
        self.session_id = reply.session_id
        self.server_name = reply.server_name
        self.protocol_version = reply.version
        self._info = facts_from_proto(reply.device)
        if reply.HasField("shared_memory"):
            self._window = _take_window(reply.shared_memory)
        self._data_offer = reply.data_channel if reply.HasField("data_channel") else None
        self._open_data = open_data_channel
        if self._data_offer is not None and open_data_channel is not None and frames_on_data \
                and reply.version >= wire.FRAMES_ON_DATA_SINCE:
            # Opened in the background: the connect does not wait for a second TLS
            # handshake, and the frames move over when it is done (`_send`).
            self._open_data_in_background()
        # Else the data channel opens with the first large transfer, not here: a session
        # that moves no bulk data pays no second TLS handshake for it.

    @property
    def data_channel(self) -> bool:
        """Whether bulk data moves over a data channel beside the stream (TCP, with TLS):
        open, being opened, or offered and to be opened by the first large transfer."""
        return self._data is not None or self._data_opening is not None or (
            self._data_offer is not None and self._open_data is not None)

    @property
    def frames_on_data(self) -> bool:
        """Whether the session's calls and replies travel on its data channel by now."""
        return self._frames_on_data is not None

    def _data_socket(self) -> Any:
        """The data channel, opened now if it was offered and is not yet (waited for if it
        is being opened); None (the stream carries the bytes) when there is none or it
        cannot be opened."""
        if self._data_opening is not None:
            self._data_opening.wait()
            self._adopt_data()
        elif self._data is None and self._data_offer is not None and \
                self._open_data is not None:
            offer, self._data_offer = self._data_offer, None
            self._data = self._open_data(offer)
        return self._data

    def _open_data_in_background(self) -> None:
        offer, self._data_offer = self._data_offer, None
        opening = self._data_opening = threading.Event()
        open_data = self._open_data

        def run() -> None:
            sock = None
            try:
                sock = open_data(offer)
            except Exception:  # the opener says why it could not; the stream goes on
                log.exception("opening the data channel failed")
            finally:
                with self._data_lock:
                    if self._closed:               # the device is gone meanwhile
                        if sock is not None:
                            sock.close()
                    else:
                        self._data_opened = sock
                opening.set()
        threading.Thread(target=run, name="harp-data-open", daemon=True).start()

    def _adopt_data(self) -> None:
        """Take the socket the background open made (with `_lock` held, between frames):
        the session's frames move onto it. The stream is told first
        (`FRAMES_ON_DATA`, after every frame it carried), then every frame and reply goes
        on the channel, in order with the bulk data already there; the stream stays open
        for the session's end. When the session's call ends (the server ended it, or
        keepalive found the link dead), the channel is shut, which wakes a wait on it: so
        the socket has no timeout from here on, and a server that stops reading while
        its queue is full (back-pressure, behind long kernels) holds a send as long as
        gRPC's flow control would have."""
        with self._data_lock:
            sock, self._data_opened = self._data_opened, None
        self._data_opening = None
        if sock is None:
            return
        sock.settimeout(None)
        self._data = sock
        self._requests.put(wire.FRAMES_ON_DATA_TAG)
        self._frames_on_data = FrameChannel(sock)
        if not self._call.add_callback(self._call_ended):
            shut(sock)                             # over already

    def _call_ended(self) -> None:
        sock = self._data
        if sock is not None:
            shut(sock)

    @property
    def shared_memory(self) -> bool:
        """Whether bulk data moves through a shared-memory window (a same-host session)."""
        return self._window is not None

    # -- transport -----------------------------------------------------------------
    def _frames(self) -> Iterator[bytes]:
        """The request stream gRPC's sending thread pulls from.

        A bulk write is queued as a job and cut into chunks here, in the sending
        thread, one chunk per pull: gRPC pulls the next one only when flow
        control lets it send, so the copies stay one chunk ahead of the wire and
        no thread hands chunks to another.
        """
        get = self._requests.get
        tag = wire.PAYLOAD_TAG
        while True:
            item = get()
            if item is None:
                return
            if type(item) is _BulkJob:
                view, chunk = item.view, item.chunk
                for pos in range(0, view.nbytes, chunk):
                    yield tag + view[pos:pos + chunk]
                item.done.set()
                continue
            yield item

    def _handshake_timed_out(self) -> None:
        self._timed_out = True
        self._call.cancel()

    def _next_frame(self, what: str) -> bytes:
        channel = self._frames_on_data
        if channel is not None:
            try:
                frame = channel.recv()
                if frame is not None:
                    return frame
                error: BaseException = ConnectionError("the server closed it")
            except (OSError, ProtocolError) as exc:
                error = exc
            self._data_broken(what, error)
            if self.explain is not None:
                self._broken = self.explain(self._broken)
            raise self._broken  # type: ignore[misc]
        try:
            return next(self._responses)
        except StopIteration:
            self._broken = TransportError(f"{what}: the server ended the session")
        except grpc.RpcError as exc:
            self._broken = self._ended(exc, what)
        if self.explain is not None:
            self._broken = self.explain(self._broken)
        raise self._broken

    def _ended(self, exc: grpc.RpcError, what: str) -> HarpError:
        """Why the call ended: the server's own reason when it gave one (trailing metadata,
        or its answer to `Why` when it cancelled the call), else the gRPC failure."""
        error = ended_error(exc, what)
        if exc.code() == grpc.StatusCode.CANCELLED and self.session_id and not self._closed \
                and not self._timed_out:
            reason = self._why()
            if reason is not None:
                return reason
        return error

    def _why(self) -> HarpError | None:
        try:
            answer = self._channel.unary_unary(WHY_METHOD)(self.session_id.encode(), timeout=5)
        except (grpc.RpcError, ValueError):
            return None
        return error_from_bytes(answer) if answer else None

    def _frame(self, what: str) -> Reply | Payload:
        """The next frame, as the protocol reads it."""
        frame = self._next_frame(what)
        try:
            return self._proto.receive(frame)
        except ProtocolError as exc:
            self._broken = exc
            raise

    def _send(self, frame: bytes) -> None:
        if self._broken is not None:
            raise self._broken
        channel = self._frames_on_data
        if channel is None:
            opening = self._data_opening
            if opening is None or not opening.is_set():
                self._requests.put(frame)
                return
            self._adopt_data()
            channel = self._frames_on_data
            if channel is None:
                self._requests.put(frame)
                return
        try:
            channel.send(frame)
        except OSError as exc:
            raise self._data_broken("send", exc) from None

    def _send_bulk(self, view: memoryview) -> None:
        """Send a write's payload as chunks; return once every chunk has been copied out."""
        job = _BulkJob(view, wire.CHUNK_SIZE)
        self._send(job)  # type: ignore[arg-type]
        while not job.done.wait(1.0):
            if not self._call.is_active():
                self._broken = self._reason("write")
                raise self._broken

    def _reason(self, what: str) -> HarpError:
        """Why the call is over, once it is (the server's error when it gave one)."""
        try:
            for key, value in self._call.trailing_metadata() or ():
                if key == wire.ERROR_METADATA:
                    return error_from_bytes(value)
            if self._call.code() == grpc.StatusCode.CANCELLED:
                reason = self._why()
                if reason is not None:
                    return reason
        except Exception:
            pass
        return TransportError(f"{what}: the connection to the server is gone")

    def _issue(self, record: list, payload: int = 0) -> None:
        """Queue an async call; the batch leaves when it is full (calls or bytes)."""
        frame = self._proto.call(record, payload)
        if frame is not None:
            self._send(frame)

    def _next(self) -> int:
        if self._closed:
            raise HarpError("the device session is closed")
        self._seq += 1
        return self._seq

    def _sync(self, record: list) -> Any:
        """Send `record` with the pending batch and return its reply's result."""
        if self._broken is not None:
            raise self._broken
        self._send(self._proto.sync(record))
        event = self._frame(wire.SCHEMA[record[0]][0])
        if type(event) is not Reply:
            self._broken = ProtocolError("the server sent payload where a reply was due")
            raise self._broken
        return event.result

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
            if self._window is not None:
                self._send(self._proto.shm_write([wire.WRITE_SHM, seq, buf.id, offset, sid,
                                                  nbytes]))
                self._through_window("write", self._put_all, view)
                return
            data = self._data_socket()
            self._send(self._proto.chunked_write(
                [wire.WRITE_CHUNKED, seq, buf.id, offset, sid, nbytes]))
            if data is not None:
                self._send(self._proto.data_frame(nbytes))
                try:
                    data.sendall(view)
                except (OSError, ValueError) as exc:
                    raise self._data_broken("write", exc) from None
                return
            self._send_bulk(view)

    def read(self, buf: Buffer, offset: int, nbytes: int, out: Any = None,
             stream: Stream | None = None) -> Any:
        with self._lock:
            seq = self._next()
            offset, nbytes = check_range(buf, offset, nbytes, "read")
            sid = check_stream(stream).id
            dst = None if out is None else out_view(out, nbytes)
            if nbytes > wire.INLINE_LIMIT:
                if self._window is not None:
                    return self._read_shm(seq, buf, offset, nbytes, sid, out, dst)
                self._data_socket()             # a large read opens the data channel
            result = self._sync([wire.READ, seq, buf.id, offset, nbytes, sid])
            try:
                inline = self._proto.read_data(result, nbytes, self._data is not None)
            except ProtocolError as exc:
                self._broken = exc
                raise
            if inline is not None:                 # a small read: the data is in the reply
                if dst is None:
                    return inline
                dst[:] = inline
                return out
            if self._data is not None:             # the payload is on the data channel
                target = memoryview(bytearray(nbytes)) if dst is None else dst
                try:
                    recv_into_exactly(self._data, target)
                except (OSError, ValueError) as exc:
                    raise self._data_broken("read", exc) from None
                return bytes(target.obj) if dst is None else out
            chunks, pos = [], 0
            while pos < nbytes:
                event = self._frame("read")
                chunk = event.data                 # type: ignore[union-attr]
                if dst is None:
                    chunks.append(chunk)
                else:
                    dst[pos:pos + len(chunk)] = chunk
                pos += len(chunk)
        return b"".join(chunks) if dst is None else out

    def _read_shm(self, seq: int, buf: Buffer, offset: int, nbytes: int, sid: int, out: Any,
                  dst: memoryview | None) -> Any:
        """A large read through the window: its chunks, then its reply."""
        if self._broken is not None:
            raise self._broken
        target = memoryview(bytearray(nbytes)) if dst is None else dst
        self._send(self._proto.sync([wire.READ_SHM, seq, buf.id, offset, nbytes, sid]))
        received = self._through_window("read", self._take_all, target)
        event = self._frame("read")                # raises the read's error, if it failed
        try:
            self._proto.shm_read_done(event.result, nbytes, received)  # type: ignore[union-attr]
        except ProtocolError as exc:
            self._broken = exc
            raise
        return bytes(target.obj) if dst is None else out

    def _data_broken(self, what: str, exc: BaseException) -> HarpError:
        """The session after its data channel failed: the server's reason, if it ended
        the session, else a `TransportError` naming the failure. With the session's frames
        on the channel, a server that ends the session shuts the channel and then ends the
        call with the reason: the call's end is waited for (a few seconds at most)."""
        if self._frames_on_data is not None:
            if not self._closed:
                over = threading.Event()
                if self._call.add_callback(over.set):
                    over.wait(END_WAIT_S)
            # ended as a stream's call ends: the reason, or what gRPC saw (a ping timeout)
            reason = self._ended(self._call, what) if not self._call.is_active() and \
                self._call.code() != grpc.StatusCode.OK else None
        else:
            reason = self._reason(what) if not self._call.is_active() else None
        self._broken = reason or TransportError(f"{what}: the data channel failed: {exc}")
        return self._broken

    def _put_all(self, view: memoryview, alive: Any) -> int:
        window = self._window
        assert window is not None
        step = window.slot_size
        for pos in range(0, view.nbytes, step):
            window.put(view[pos:pos + step], alive)
        return view.nbytes

    def _take_all(self, target: memoryview, alive: Any) -> int:
        window = self._window
        assert window is not None
        pos, nbytes = 0, target.nbytes
        while pos < nbytes:
            n = window.take(target[pos:], alive)
            if n < 0:
                break                              # the read failed; its reply says why
            pos += n
        return pos

    def _through_window(self, what: str, move: Any, view: memoryview) -> int:
        """Move a transfer's bytes through the window; a session the server ended meanwhile
        raises the server's reason."""
        try:
            return move(view, self._call.is_active)
        except TransportError:
            self._broken = self._reason(what)
            raise self._broken from None
        except ProtocolError as exc:
            self._broken = exc
            raise

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
            module = Module(self._ids.new(), check_format(format))
            self._issue([wire.LOAD_MODULE, seq, module.id, module.format, image], len(image))
        return module

    def function(self, module: Module, name: str) -> Function:
        with self._lock:
            seq = self._next()
            fn = Function(self._ids.new(), check_kernel_name(name))
            self._issue([wire.FUNCTION, seq, fn.id, check_module(module).id, fn.name])
        return fn

    def launch(self, fn: Function, grid: Dims, block: Dims, args: Sequence[Any],
               shared_mem: int = 0, stream: Stream | None = None) -> None:
        with self._lock:
            seq = self._next()
            check_function(fn)
            grid3, block3 = check_dims(grid, "grid"), check_dims(block, "block")
            shared_mem = check_count(shared_mem, "shared_mem")
            if not args:
                encoded = []
            elif type(args) is list or type(args) is tuple:
                encoded = wire.encode_args(args)
            else:
                encoded = wire.encode_args(normalize_args(args))
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
        with self._data_lock:                      # a background open's socket, unadopted
            opened, self._data_opened = self._data_opened, None
            self._closed = True
        if opened is not None:
            opened.close()
        if self._data is not None:               # first: a server reading frames on it
            try:                                 # sees their end before the call's
                self._data.close()
            except OSError:
                pass
        self._requests.put(None)
        self._call.cancel()
        self._channel.close()
        if self._window is not None:
            self._window.close()
