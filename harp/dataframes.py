"""A session's frames on its data channel: each one its length, then its bytes.

Once a session's data channel is open, its client moves the session's frames
there (`wire.FRAMES_ON_DATA`, protocol 3): calls, replies, and the bulk data
that was already on it, one ordered byte stream in both directions. A frame is
a little-endian u32 length and the same bytes the gRPC stream would carry as
one message, so everything that checks a frame checks it the same way; the
length itself is checked against `wire.MAX_FRAME` before anything is read.

Why: the gRPC stream costs each frame a hand-off between threads on both sides
(the client's request iterator, the server's completion queue), the bulk of a
sync round trip's and of a small write's CPU on this kind of host. On the data
channel the calling thread writes the frame and reads the reply itself.

Waiting for a frame blocks without a timeout (a sync may wait on a long kernel,
a session may sit idle): a channel is woken by being shut down, which the
session's owner does when the session's gRPC call ends (a dead peer is noticed
there by keepalive) or when the server ends the session. Once a frame has
started, the rest of it must come within `FRAME_DEADLINE_S` (plus a second per
MiB), each read within the socket's own timeout, and its buffer grows only as
its bytes come.
"""
from __future__ import annotations

import select
import socket
import struct
import time
from typing import Any

from .errors import ProtocolError
from .wire import MAX_FRAME

HEADER = struct.Struct("<I")
#: Frames up to this size go out in one `sendall` with their header (one TLS record
#: or a few); larger ones (a full batch) are not copied to prepend it.
_JOIN_BELOW = 64 << 10
#: The most one read of a frame's body asks for: the buffer grows by what came, so a
#: length claimed is not memory held until its bytes arrive.
_GROW = 1 << 20
#: A started frame must be whole within this long, plus a second per MiB of it: a
#: client that trickles a byte now and then cannot hold a handler (or its buffer).
FRAME_DEADLINE_S = 30.0


class FrameChannel:
    """Frames over one connected socket (a data channel): `send` and `recv`, each from one
    thread at a time."""

    def __init__(self, sock: Any, limit: int = MAX_FRAME,
                 deadline_s: float = FRAME_DEADLINE_S) -> None:
        self.sock = sock
        self.limit = limit
        self.deadline_s = deadline_s
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN | select.POLLPRI)

    def send(self, frame: bytes) -> None:
        """Send one frame (`OSError` if the channel is broken or shut down)."""
        n = len(frame)
        if n < _JOIN_BELOW:
            self.sock.sendall(HEADER.pack(n) + frame)
        else:
            self.sock.sendall(HEADER.pack(n))
            self.sock.sendall(frame)

    def recv(self) -> bytes | bytearray | None:
        """The next frame, waiting for it as long as it takes; None if the peer closed the
        channel between frames. `ProtocolError` for a frame over the limit (nothing of it
        is read), `OSError` for a channel that broke or was shut down mid-frame, and
        `TimeoutError` for a frame not whole by its deadline."""
        while True:
            self._wait()
            try:
                first = self.sock.recv(HEADER.size)
            except TimeoutError:     # readable, but no byte of a frame came (a TLS record
                continue             # of TLS's own): wait on
            break
        if not first:
            return None
        deadline = time.monotonic() + self.deadline_s
        header = first if len(first) == HEADER.size else \
            bytes(self._rest(first, HEADER.size, deadline))
        (n,) = HEADER.unpack(header)
        if n > self.limit:
            raise ProtocolError(f"a frame of {n} bytes on the data channel "
                                f"(at most {self.limit})")
        if n == 0:
            return b""
        body = self.sock.recv(min(n, _GROW))
        if not body:
            raise ConnectionError("the data channel closed in the middle of a frame")
        return body if len(body) == n else \
            self._rest(body, n, deadline + n / (1 << 20))

    def _wait(self) -> None:
        """Block until the socket has something to read: bytes TLS has already decrypted
        count (select cannot see those), and so does a shut-down or reset channel."""
        pending = getattr(self.sock, "pending", None)
        if pending is None or not pending():
            self._poll.poll()             # no timeout: returns only with something to say

    def _rest(self, first: bytes, n: int, deadline: float) -> bytearray:
        """`first` and the rest of its `n` bytes, the buffer grown as they come
        (`ConnectionError` if they stop short, `TimeoutError` past `deadline`)."""
        buf = bytearray(first)
        while len(buf) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"a frame of {n} bytes on the data channel was not whole "
                                   f"in time ({len(buf)} came)")
            chunk = self.sock.recv(min(n - len(buf), _GROW))
            if not chunk:
                raise ConnectionError("the data channel closed in the middle of a frame "
                                      f"({len(buf)} of {n} bytes)")
            buf += chunk
        return buf


def shut(sock: Any) -> None:
    """Wake whoever waits on `sock` (a frame, a payload): it sees the channel end."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
