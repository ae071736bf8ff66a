"""The data listener: mutual-TLS sockets beside the gRPC stream, one per session, for bulk bytes.

gRPC's Python API sends only `bytes` and hands received messages over as new
`bytes`, so every chunk of a bulk transfer costs copies that a plain TLS
socket does not: a client can `sendall` straight from its buffer, and the
server can `recv_into` the slot of shared memory its session's worker reads.
So a pool server with TLS opens one data listener per TCP listen address
(same host, a port of its own) and offers each session a one-time ticket in
the handshake. The client connects with the same client certificate it used
for the stream, shows the ticket, and gets one byte back (`ACK`) once the
session has its socket; from then on a chunked write's bytes and a large
read's payload go on it, while records, replies and errors stay on the stream.

A connection is bound to its session twice: by the ticket (32 random bytes
sent over the session's own mutual-TLS stream, good once, while the session lasts)
and by identity (the certificate on the data connection must name the
session's identity). TLS handshakes run in threads of their own, at most
`MAX_PENDING` at once, each bounded by `HANDSHAKE_TIMEOUT_S`, so a peer that
connects and says nothing holds nothing for long.
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading

from harp.security import identity_from_pem
from harp.shm import TICKET_BYTES
from harp.transport import recv_exactly

from .tickets import TicketBook

log = logging.getLogger("harp.server.data")

#: A ticket is good for the life of its session (the client opens the channel with its
#: first large transfer); the server discards it when the session ends.
TICKET_TTL_S = 24 * 3600.0
HANDSHAKE_TIMEOUT_S = 5.0
MAX_PENDING = 32
ACK, NACK = b"\x01", b"\x00"
#: Seconds a data socket may make no progress during a transfer before the session ends.
IO_TIMEOUT_S = 30.0


class DataListener:
    """Accepts data connections on one address and hands each to the session it names."""

    def __init__(self, host: str, context: ssl.SSLContext, tickets: TicketBook,
                 port: int = 0) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if family == socket.AF_INET6:
                self._sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            self._sock.bind((host, port))
            self._sock.listen(64)
        except OSError:
            self._sock.close()
            raise
        self.host, self.port = host, self._sock.getsockname()[1]
        self._context = context
        self._tickets = tickets
        self._pending = threading.BoundedSemaphore(MAX_PENDING)
        self._stopped = False
        self._thread = threading.Thread(target=self._accept_loop, name="harp-data-listener",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def _accept_loop(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            if not self._pending.acquire(blocking=False):
                conn.close()                          # too many handshakes at once
                continue
            threading.Thread(target=self._admit, args=(conn,), name="harp-data-handshake",
                             daemon=True).start()

    def _admit(self, conn: socket.socket) -> None:
        sock: socket.socket = conn
        given = False
        try:
            conn.settimeout(HANDSHAKE_TIMEOUT_S)
            sock = tls = self._context.wrap_socket(conn, server_side=True)
            claim = self._tickets.claim(recv_exactly(tls, TICKET_BYTES))
            if claim is None:
                tls.sendall(NACK)
                return
            identity, attach = claim                  # see `PoolServer._offer_data`
            der = tls.getpeercert(binary_form=True)
            who = identity_from_pem(ssl.DER_cert_to_PEM_cert(der).encode()) if der else None
            if who is None or who.name != identity:
                log.info("a data connection for %s came with the certificate of %s",
                         identity, who.name if who else "nobody")
                tls.sendall(NACK)
                return
            tls.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls.settimeout(IO_TIMEOUT_S)
            # The yes goes out before the session may use the socket (see attach_data).
            given = attach(tls, lambda: tls.sendall(ACK))
            if not given:
                tls.sendall(NACK)
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.debug("data connection refused: %s", exc)
        finally:
            if not given:
                sock.close()
            self._pending.release()
