"""A service's Prometheus endpoint: `/metrics` over HTTPS with mutual TLS, or plain on loopback.

Pool servers and the scheduler expose their figures (`harp server serve
--metrics-listen`, `harp scheduler serve --metrics-listen`) in Prometheus's text
format, rendered by `prometheus-client` from a registry of collectors that read
the service's own books when scraped. Per-session series name identities and
leases, so the endpoint is protected like every other HARP service:

- With the service's TLS files (the default): HTTPS, TLS 1.3, the service's own
  certificate, and a client certificate signed by the pool CA is required. Only
  the roles in `security.MONITOR_ROLES` may read: `monitor` (a Prometheus
  server's certificate, `harp certs issue monitor NAME`, which no scheduler or
  pool server accepts for anything else) and `admin`. Other certificates get 403.
- Plain HTTP only when asked (`insecure=True`: a service started with
  `--insecure`, or `--metrics-insecure`), and only on a loopback address.

Each connection is handled in a thread of its own, at most `MAX_CONNECTIONS` at
once, each read bounded by `IO_TIMEOUT_S` and the whole connection by
`CONNECTION_DEADLINE_S` (the TLS handshake included), so a peer that
connects and says nothing holds nothing for long.
"""
from __future__ import annotations

import http.server
import logging
import socket
import socketserver
import ssl
import threading
from typing import Any

from .errors import AuthError, BackendError, TransportError
from .security import MONITOR_ROLES, TlsFiles, identity_from_pem, ssl_server_context
from .transport import is_loopback, split_host_port

log = logging.getLogger("harp.metrics")

PATH = "/metrics"
MAX_CONNECTIONS = 16
IO_TIMEOUT_S = 10.0
#: The most one connection may last, the TLS handshake included (one request each):
#: a peer trickling bytes inside `IO_TIMEOUT_S` holds its slot no longer than this.
CONNECTION_DEADLINE_S = 30.0


def prometheus() -> Any:
    """The `prometheus_client` module, or a clear error naming the extra that brings it."""
    try:
        import prometheus_client
    except ImportError:
        raise BackendError("metrics need prometheus-client: pip install 'harp[metrics]'") \
            from None
    return prometheus_client


class MetricsEndpoint:
    """Serves one registry's metrics at `/metrics` on one address, until `stop`."""

    def __init__(self, registry: Any, address: str, *, tls: TlsFiles | None = None,
                 insecure: bool = False) -> None:
        if insecure:
            if not is_loopback(address):
                raise AuthError(f"refusing plain-text metrics on {address}, which is not a "
                                "loopback address (plain text, --insecure or --metrics-insecure,"
                                " is for loopback only); serve them over HTTPS with the pool's "
                                "certificates instead")
            self.context = None
        elif tls is None:
            raise AuthError("a metrics endpoint needs the service's TLS files, or "
                            "--metrics-insecure on a loopback address")
        else:
            self.context = ssl_server_context(tls)
        self.registry = registry
        self.exposition = prometheus().exposition
        host, port = split_host_port(address)
        self._host = host.strip("[]")
        self._port = int(port)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._http: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self.address = ""

    @property
    def scheme(self) -> str:
        return "http" if self.context is None else "https"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.address}{PATH}"

    def start(self) -> str:
        """Bind and serve in a background thread; returns the bound HOST:PORT."""
        try:
            http_server = _HttpServer(self, (self._host, self._port))
        except OSError as exc:
            raise TransportError(f"cannot serve metrics on {self._host}:{self._port}: "
                                 f"{exc.strerror or exc}") from None
        self._http = http_server
        host, port = http_server.server_address[:2]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._thread = threading.Thread(target=http_server.serve_forever, kwargs={
            "poll_interval": 0.5}, name="harp-metrics", daemon=True)
        self._thread.start()
        log.info("metrics on %s", self.url)
        return self.address

    def stop(self) -> None:
        http_server, self._http = self._http, None
        if http_server is not None:
            http_server.shutdown()
            http_server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    # -- one connection, in its own thread -------------------------------------------------
    def _connection(self, sock: socket.socket, peer: Any, http_server: "_HttpServer") -> None:
        raw = sock
        deadline = threading.Timer(CONNECTION_DEADLINE_S, _cut, args=(raw,))
        deadline.daemon = True
        deadline.start()
        try:
            sock.settimeout(IO_TIMEOUT_S)
            role = None
            if self.context is not None:
                try:
                    sock = self.context.wrap_socket(sock, server_side=True)
                    der = sock.getpeercert(binary_form=True)
                    role = identity_from_pem(ssl.DER_cert_to_PEM_cert(der).encode()).role \
                        if der else None
                except (OSError, ssl.SSLError, ValueError, AuthError) as exc:
                    log.info("metrics: refused a connection from %s: %s", peer, exc)
                    return
            _Handler(sock, peer, http_server, allowed=self.context is None or
                     role in MONITOR_ROLES)
        except (OSError, ValueError):
            pass                                   # the peer went, or timed out
        finally:
            deadline.cancel()
            try:
                sock.close()
            except OSError:
                pass
            self._slots.release()

    def render(self) -> bytes:
        """The registry's current figures in Prometheus's text format."""
        return self.exposition.generate_latest(self.registry)


def _cut(sock: socket.socket) -> None:
    """End a connection past its deadline: its thread's read or write returns at once."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _HttpServer(http.server.HTTPServer):
    """Accepts on one address; each connection runs in a daemon thread, within the cap."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, endpoint: MetricsEndpoint, address: tuple[str, int]) -> None:
        self.endpoint = endpoint
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # http.server's own looks up the host's fully qualified name, which can wait on DNS
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.endpoint._slots.acquire(blocking=False):
            self.shutdown_request(request)             # too many at once: drop this one
            return
        threading.Thread(target=self.endpoint._connection, args=(request, client_address, self),
                         name="harp-metrics-conn", daemon=True).start()


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET /metrics; 403 for a certificate whose role may not read, 404 elsewhere."""

    server_version = "harp-metrics"
    protocol_version = "HTTP/1.0"

    def __init__(self, request: Any, client_address: Any, server: Any,
                 allowed: bool = False) -> None:
        self.allowed = allowed
        super().__init__(request, client_address, server)

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        if self.path.split("?", 1)[0] != PATH:
            self._reply(404, b"not found: metrics are at /metrics\n")
        elif not self.allowed:
            self._reply(403, f"forbidden: metrics are for certificates of role "
                             f"{' or '.join(MONITOR_ROLES)}\n".encode())
        else:
            try:
                body = self.server.endpoint.render()
            except Exception:                          # a collector's bug: say so, stay up
                log.exception("metrics: collecting failed")
                self._reply(500, b"collecting the metrics failed; see the service's log\n")
                return
            self._reply(200, body, self.server.endpoint.exposition.CONTENT_TYPE_LATEST)

    def _reply(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
        log.debug("metrics: %s " + format, self.address_string(), *args)
