"""The door: where a same-host client picks up its session's shared-memory window.

File descriptors cannot travel over gRPC, so a pool server that listens on a
unix socket also opens a door beside it (`PATH.shm`): a unix socket that
hands each session's window (`harp.shm.SharedWindow`: a memfd and two
eventfds) to the client that shows the session's ticket. The ticket is 32
random bytes the server gave that client in its handshake, over the
session's mutually authenticated stream; it is good once, for
`TICKET_TTL_S`. Anyone else who reaches the door gets nothing, and a client
that cannot reach it (another mount namespace, a slow door) keeps its
session and moves its bulk data over the stream as before.
"""
from __future__ import annotations

import logging
import os
import socket
import stat
import threading

from harp.shm import TICKET_BYTES, close_all
from harp.transport import recv_exactly

from .tickets import TicketBook

log = logging.getLogger("harp.server.door")

#: Seconds a ticket stays good, and a caller may take to show it.
TICKET_TTL_S = 10.0
SHOW_TIMEOUT_S = 1.0


def door_path(unix_address: str) -> str:
    """The door of a unix listen address (`unix:/run/harp.sock` -> `/run/harp.sock.shm`)."""
    path = unix_address.split(":", 1)[1]
    if path.startswith("//"):
        path = path[2:]
    return path + ".shm"


class Door:
    """A listening unix socket that trades tickets for file descriptors."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.tickets = TicketBook(TICKET_TTL_S, on_drop=close_all)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)            # a door left by a server that died
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        sock.listen(64)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="harp-door", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass
        self.tickets.clear()

    def offer(self, fds: list[int]) -> bytes:
        """A ticket for duplicates of `fds` (the caller keeps its own)."""
        return self.tickets.offer([os.dup(fd) for fd in fds])

    def _serve(self) -> None:
        while True:
            sock = self._sock
            if sock is None:
                return
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn:
                fds = None
                try:
                    conn.settimeout(SHOW_TIMEOUT_S)
                    fds = self.tickets.claim(recv_exactly(conn, TICKET_BYTES))
                    if fds is None:
                        conn.sendall(b"\x00")
                        continue
                    socket.send_fds(conn, [b"\x01"], fds)
                except OSError as exc:
                    log.debug("door: %s", exc)
                finally:
                    if fds is not None:
                        close_all(fds)
