"""Options shared by the commands: sizes, counts, addresses, TLS, the scheduler."""
from __future__ import annotations

import argparse
import os
from typing import Any

from ..units import format_size, parse_size

DEFAULT_SCHEDULER = "harp://127.0.0.1:50050"


# -- argument types: a bad value is a one-line usage error, never a traceback -------------

def size(text: str) -> int:
    """A byte size: 4096, 512MiB, 4GiB, 1.5GB, 1Mi."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_count(text: str) -> int:
    """A number of elements, at least 1, written as a size may be: 1048576, 1Mi, 64k."""
    if text.strip().startswith("-"):
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    try:
        value = parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (examples: 4096, 64k, "
                                         "1Mi)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def count(text: str) -> int:
    """A whole number >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {value:g}")
    return value


def share(text: str) -> float:
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"a compute share is in (0, 1], got {value:g}")
    return value


def listen_address(text: str) -> str:
    """HOST:PORT (port 0 to 65535; 0 picks a free one), [IPv6]:PORT, or unix:/PATH."""
    if text.startswith("unix:"):
        if len(text) <= len("unix:"):
            raise argparse.ArgumentTypeError("unix: needs a path, e.g. unix:/run/harp.sock")
        return text
    from ..transport import split_host_port
    host, port = split_host_port(text)
    if not host or ":" not in text or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not HOST:PORT with a port from 0 to 65535 (0 picks a free one), "
            "[IPv6]:PORT, or unix:/PATH")
    return text


def metrics_address(text: str) -> str:
    """HOST:PORT or [IPv6]:PORT for a metrics endpoint (port 0 picks a free one)."""
    if text.startswith("unix:"):
        raise argparse.ArgumentTypeError("metrics are served over TCP: HOST:PORT, e.g. "
                                         "127.0.0.1:9464")
    return listen_address(text)


def add_metrics_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics-listen", default=None, type=metrics_address, metavar="HOST:PORT",
                   help="serve Prometheus metrics at /metrics on this address, over HTTPS "
                        "with the service's certificate, to client certificates of role "
                        "monitor or admin (port 0 picks a free one)")
    p.add_argument("--metrics-insecure", action="store_true",
                   help="serve the metrics over plain HTTP (loopback addresses only); "
                        "--insecure implies it")


def metrics_endpoint(args: argparse.Namespace) -> Any:
    """The metrics endpoint the options ask for, checked (TLS files, the loopback rule) but
    not started, with an empty registry for the service's collectors; None without
    --metrics-listen."""
    if not getattr(args, "metrics_listen", None):
        return None
    from harp.metrics import MetricsEndpoint, prometheus
    insecure = bool(args.insecure or args.metrics_insecure)
    return MetricsEndpoint(prometheus().CollectorRegistry(), args.metrics_listen,
                           tls=None if insecure else server_tls(args), insecure=insecure)


def start_metrics(endpoint: Any) -> None:
    """Start a metrics endpoint (from `metrics_endpoint`) and say where it is."""
    if endpoint is None:
        return
    endpoint.start()
    say(f"HARP metrics on {endpoint.url}" + (" (client certificates of role monitor or admin)"
                                             if endpoint.scheme == "https" else ""))


def add_scheduler_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", default=None, type=scheduler_addresses,
                   help=f"scheduler address (default: $HARP_SCHEDULER or {DEFAULT_SCHEDULER}; "
                        "harp+insecure://... for plain text on loopback); replicas: several, "
                        "comma-separated")
    p.add_argument("--cert-dir", default=None, help="certificate directory of this client")
    p.add_argument("--cert-name", default=None,
                   help="certificate to present, NAME.pem/NAME.key in the directory (default: "
                        "client; admin for admin-only commands when admin.pem is there)")


def scheduler_addresses(text: str) -> str:
    """One scheduler address or several, comma-separated: "harp://a:50050,harp://b:50050"
    (HOST:PORT alone means harp://HOST:PORT)."""
    from ..errors import ArgumentError
    from ..replicas import split_addresses
    try:
        return ",".join(split_addresses(text))
    except ArgumentError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def scheduler_address(args: argparse.Namespace) -> str:
    """The scheduler's address(es) from --scheduler, $HARP_SCHEDULER or the default."""
    from ..replicas import split_addresses
    address = args.scheduler or os.environ.get("HARP_SCHEDULER") or DEFAULT_SCHEDULER
    return ",".join(split_addresses(address))


def scheduler_client(args: argparse.Namespace, admin: bool = False) -> Any:
    """A scheduler client with this user's certificate (an admin's for admin commands,
    when the directory has one and none was named)."""
    from harp.client import SchedulerClient
    from harp.security import default_cert_dir
    name = getattr(args, "cert_name", None)
    if name is None and admin and not os.environ.get("HARP_TLS_CERT"):
        directory = args.cert_dir or default_cert_dir()
        if os.path.exists(os.path.join(str(directory), "admin.pem")):
            name = "admin"
    return SchedulerClient(scheduler_address(args), cert_dir=args.cert_dir, cert_name=name)


def add_tls_server_options(p: argparse.ArgumentParser, default_name: str) -> None:
    p.add_argument("--insecure", action="store_true",
                   help="plain text instead of mutual TLS (loopback addresses only)")
    p.add_argument("--cert-dir", default=None, help="certificate directory")
    p.add_argument("--tls-ca", default=None, help="CA certificate (or HARP_TLS_CA)")
    p.add_argument("--tls-cert", default=None, help="certificate (or HARP_TLS_CERT)")
    p.add_argument("--tls-key", default=None, help="key (or HARP_TLS_KEY)")
    p.add_argument("--cert-name", default=default_name,
                   help=f"certificate name in the directory (default: {default_name})")


def server_tls(args: argparse.Namespace) -> Any:
    """The service's TLS files, checked to be a server certificate."""
    from harp.security import CertError, identity_from_pem, tls_files
    files = tls_files("server", args.cert_name, directory=args.cert_dir, ca=args.tls_ca,
                      cert=args.tls_cert, key=args.tls_key)
    _, cert, _ = files.load()
    who = identity_from_pem(cert)
    if who.role != "server":
        raise CertError(f"{files.cert} is a {who.role} certificate ({who.name}); a service "
                        "needs a server certificate: harp certs issue server NAME, then "
                        "--cert-name NAME")
    return files


def server_credentials(args: argparse.Namespace) -> Any:
    """gRPC server credentials from the TLS options, or None with --insecure."""
    if args.insecure:
        return None
    from harp.security import server_credentials as creds
    return creds(server_tls(args))


def wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM.

    Called once a service is up: what exists then lives as long as the process,
    so it is moved out of the garbage collector's sight (`gc.freeze`), which
    takes the collector's pauses off the hot paths (about 8% of launch time).
    """
    import gc
    import signal
    import threading
    gc.collect()
    gc.freeze()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


def say(text: str) -> None:
    """A status line on stdout that may go nowhere (a closed pipe) without a traceback."""
    try:
        print(text, flush=True)
    except (BrokenPipeError, ValueError):
        pass


__all__ = ["size", "positive_int", "positive_count", "count", "positive_float", "share",
           "listen_address",
           "format_size", "add_scheduler_options", "scheduler_address", "scheduler_addresses",
           "scheduler_client",
           "add_tls_server_options", "server_tls", "server_credentials", "wait_for_signal", "say",
           "metrics_address", "add_metrics_options", "metrics_endpoint", "start_metrics"]
