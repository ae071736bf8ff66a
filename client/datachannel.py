"""The client's side of a session's data channel: mutual TLS beside the gRPC stream.

A pool server with TLS offers each TCP session a data channel in its
handshake (a port on the host the client reached it at, and a one-time
ticket). The client connects there with the same certificate as for the
stream, checks the server's certificate as the stream does, shows the
ticket, and waits for the server's one-byte yes. Then a large write leaves
straight from the caller's buffer (`sendall` of a memoryview: no copy in
Python) and a large read lands straight in the caller's `out` (`recv_into`).
Anything that goes wrong on the way leaves the session on the stream.
"""
from __future__ import annotations

import logging
import socket
import ssl
from typing import Any, Callable

from harp.security import TlsFiles
from harp.transport import split_host_port

log = logging.getLogger("harp.client")

ACK = b"\x01"
#: Seconds to open the channel, and without progress during a transfer.
OPEN_TIMEOUT_S = 5.0
IO_TIMEOUT_S = 30.0


def opener(address: str, files: TlsFiles, server_name: str | None) -> Callable[[Any], Any]:
    """A function that opens the offered data channel of a session on `address` (the TCP
    address the stream dialed), or returns None when it cannot."""
    host = split_host_port(address)[0].strip("[]")

    def open_channel(offer: Any) -> ssl.SSLSocket | None:
        try:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.minimum_version = ssl.TLSVersion.TLSv1_3
            context.load_verify_locations(str(files.ca))
            context.load_cert_chain(str(files.cert), str(files.key))
            raw = socket.create_connection((host, offer.port), timeout=OPEN_TIMEOUT_S)
            try:
                sock = context.wrap_socket(raw, server_hostname=server_name or host)
                sock.sendall(offer.ticket)
                if sock.recv(1) != ACK:
                    raise OSError("the server refused the session's ticket")
            except BaseException:
                raw.close()
                raise
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(IO_TIMEOUT_S)
            return sock
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.info("no data channel to %s:%s (%s); bulk data takes the stream", host,
                     offer.port, exc)
            return None
    return open_channel
