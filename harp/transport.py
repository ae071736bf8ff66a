"""gRPC settings and address rules shared by every HARP client and server.

Chosen by measurement on loopback with TLS (see ARCHITECTURE.md): the
synchronous gRPC API, 1 MiB payload frames, default HTTP/2 windows with BDP
probing on, and keepalive pings so a dead peer is noticed within seconds.
"""
from __future__ import annotations

import ipaddress
import socket
import ssl
from typing import Any

import grpc

from .errors import ArgumentError, AuthError, HarpError, NoCapacityError, TransportError
from .wire import MAX_FRAME

#: Seconds between keepalive pings, and how long an unanswered ping may take.
KEEPALIVE_S = 10.0
KEEPALIVE_TIMEOUT_S = 5.0


def channel_options(*, keepalive_s: float = KEEPALIVE_S,
                    keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S,
                    server_name: str | None = None) -> list[tuple[str, Any]]:
    """Client channel options: frame limits, keepalive, and TLS name override."""
    opts: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", MAX_FRAME + 4096),
        ("grpc.max_receive_message_length", MAX_FRAME + 4096),
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # gRPC core times pings out after this (default 60 s), whatever keepalive_timeout says
        ("grpc.http2.ping_timeout_ms", int(keepalive_timeout_s * 1000)),
        ("grpc.enable_retries", 0),
        # Reconnect quickly after a peer restarts (the scheduler, say): gRPC's default
        # backoff grows to minutes, which would outlast a lease. Not
        # grpc.min_reconnect_backoff_ms: gRPC core also uses it as the time one connection
        # attempt may take, and 200 ms fails TLS handshakes against a busy server.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 1000),
        # A fresh channel per session: sessions never share a connection's fate.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    return opts


def server_options() -> list[tuple[str, Any]]:
    """Server options: frame limits, and accept the clients' keepalive pings."""
    return [
        ("grpc.max_send_message_length", MAX_FRAME + 4096),
        ("grpc.max_receive_message_length", MAX_FRAME + 4096),
        ("grpc.keepalive_time_ms", int(KEEPALIVE_S * 1000)),
        ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 500),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.so_reuseport", 0),
    ]


def split_host_port(address: str) -> tuple[str, str]:
    """("::1", "50051") from "[::1]:50051"; ("127.0.0.1", "0") from "127.0.0.1:0"."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        return host, rest.lstrip(":")
    host, _, port = address.rpartition(":")
    return host, port


def is_loopback(address: str) -> bool:
    """Whether a listen/dial address stays on this host (loopback IPs or a unix socket)."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host, _ = split_host_port(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback
                       for info in socket.getaddrinfo(host, None))
        except (socket.gaierror, ValueError):
            return False


def serve(server: grpc.Server, listen: list[str], credentials: grpc.ServerCredentials | None,
          health_services: tuple[str, ...]) -> list[str]:
    """Bind `server` to each address (mutual TLS, or plain text on loopback only), add the
    standard health service reporting SERVING for `health_services`, start it, and return
    the bound addresses (port 0 replaced by the port chosen)."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    if credentials is None:
        remote = [a for a in listen if not is_loopback(a)]
        if remote:
            raise AuthError(f"refusing plain text on non-loopback address(es) "
                            f"{', '.join(remote)}: use mutual TLS")
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = []
    for address in listen:
        try:
            port = server.add_secure_port(address, credentials) if credentials is not None \
                else server.add_insecure_port(address)
        except RuntimeError:
            raise ArgumentError(f"cannot listen on {address}: the address is in use or not "
                                "available here (another `harp up` or pool server on that port?)"
                                ) from None
        bound.append(address if address.startswith("unix") else
                     f"{address.rpartition(':')[0]}:{port}")
    server.start()
    for service in ("", *health_services):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return bound


def error_from_rpc(exc: grpc.RpcError, what: str) -> HarpError:
    """A `HarpError` for a failed gRPC call, by its status code: UNAUTHENTICATED and
    PERMISSION_DENIED are `AuthError`, RESOURCE_EXHAUSTED `NoCapacityError`, the rest
    `TransportError`. (A TLS handshake that fails shows as UNAVAILABLE, like an
    unreachable server; `diagnose_tls` tells the two apart with a handshake of its own.)"""
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
    name = code.name if code is not None else "UNKNOWN"
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return AuthError(f"{what}: refused: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return NoCapacityError(f"{what}: the server is full: {details}")
    return TransportError(f"{what}: {name}: {details}")


#: `ssl.SSLError.reason` values that mean the peer answered a TLS hello with something else.
_NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG",
                      "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "UNEXPECTED_EOF_WHILE_READING"})


def diagnose_tls(address: str, ca: str, cert: str, key: str, *, server_name: str | None = None,
                 timeout: float = 3.0) -> str | None:
    """Why a mutual-TLS handshake with `address` fails, in words, or None when it does not
    (then the connection failed for another reason: the server is down or busy).

    Uses Python's own TLS with the same files, and reads the failure from the `ssl`
    module's exception types: a server certificate this CA did not sign, or an alert from
    a server that refused the client's certificate (TLS 1.3 sends it after the handshake)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(ca)
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        return f"this client's TLS files cannot be used: {exc}"
    context.set_alpn_protocols(["h2"])
    try:
        if address.startswith("unix:"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(address[len("unix:"):].removeprefix("//"))
            host = server_name or "localhost"
        else:
            host, port = split_host_port(address)
            sock = socket.create_connection((host, int(port)), timeout=timeout)
            host = server_name or host
    except (OSError, ValueError):
        return None                                   # unreachable: not a TLS matter
    try:
        tls = context.wrap_socket(sock, server_hostname=host)
    except ssl.SSLCertVerificationError as exc:
        sock.close()
        return (f"the server's certificate does not verify with this client's pool CA "
                f"({exc.verify_message}): client and server hold certificates of different "
                "pools, or the server is not the one meant")
    except ssl.SSLError as exc:
        sock.close()
        if exc.reason in _NOT_TLS:
            return (f"the server at {address} does not speak TLS (it runs with --insecure?): "
                    f"reach it with harp+insecure://{address}")
        return f"the TLS handshake failed ({exc.reason or exc})"
    except OSError:
        sock.close()
        return None
    try:
        tls.settimeout(min(timeout, 1.0))
        tls.recv(1)                                   # an alert, or the server's HTTP/2 hello
    except ssl.SSLError as exc:
        return (f"the server refused this client's certificate ({exc.reason or exc}): it is "
                "not signed by the server's pool CA, or it has expired")
    except OSError:
        pass
    finally:
        tls.close()
    return None


def recv_into_exactly(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from `sock` (a data channel); `ConnectionError` if the peer stops short."""
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError(f"the data channel closed after {got} of {n} bytes")
        got += k


def recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    """`n` bytes from `sock`, or None if the peer closes first (a ticket, a header)."""
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            return None
        data += more
    return data
