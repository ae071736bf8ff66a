"""`harp server serve`: a pool server for this machine's devices of one backend."""
from __future__ import annotations

import argparse
import signal
import sys
import threading

from ..units import parse_size


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    serve = sub.add_parser("serve", help="serve devices until interrupted")
    serve.add_argument("--backend", default="cpu", help="backend whose devices to serve")
    serve.add_argument("--listen", action="append", default=[],
                       help="address to listen on, HOST:PORT or unix:/PATH (repeatable; "
                            "default 127.0.0.1:50051; port 0 picks a free one)")
    serve.add_argument("--name", default="", help="server name shown to clients")
    serve.add_argument("--insecure", action="store_true",
                       help="plain text instead of mutual TLS (loopback addresses only)")
    serve.add_argument("--cert-dir", default=None, help="certificate directory")
    serve.add_argument("--tls-ca", default=None, help="CA certificate (or HARP_TLS_CA)")
    serve.add_argument("--tls-cert", default=None, help="server certificate (or HARP_TLS_CERT)")
    serve.add_argument("--tls-key", default=None, help="server key (or HARP_TLS_KEY)")
    serve.add_argument("--cert-name", default="server",
                       help="certificate name in the directory (default: server)")
    serve.add_argument("--trust-client-code", action="store_true",
                       help="accept numba-python kernels, which run client Python on this host "
                            "(development and tests only)")
    serve.add_argument("--memory", default=None,
                       help="cpu backend: memory per device, e.g. 4GiB")
    serve.add_argument("--devices", type=int, default=1, help="cpu backend: number of devices")
    serve.add_argument("--max-sessions", type=int, default=64)


def backend_options(args: argparse.Namespace) -> dict:
    if args.backend != "cpu":
        return {}
    opts: dict = {"devices": args.devices}
    if args.memory:
        opts["memory"] = parse_size(args.memory)
    return opts


def run(args: argparse.Namespace) -> int:
    from harp.backends import load_backend
    from harp.security import server_credentials, tls_files
    from harp.server import PoolServer

    backend = load_backend(args.backend, **backend_options(args))
    ok, reason = backend.available()
    if not ok:
        print(f"harp server: backend {args.backend} is unavailable here: {reason}",
              file=sys.stderr)
        return 1
    credentials = None
    if not args.insecure:
        files = tls_files("server", args.cert_name, directory=args.cert_dir, ca=args.tls_ca,
                          cert=args.tls_cert, key=args.tls_key)
        credentials = server_credentials(files)
    server = PoolServer(backend, name=args.name, trust_client_code=args.trust_client_code,
                        max_sessions=args.max_sessions)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    bound = server.start(args.listen or ["127.0.0.1:50051"], credentials)
    scheme = "harp+insecure" if args.insecure else "harp"
    for address in bound:
        print(f"HARP pool server {server.name} listening on {scheme}://{address} "
              f"({backend.device_count()} {args.backend} device(s))", flush=True)
    stop.wait()
    print("stopping: ending sessions", flush=True)
    server.stop(grace=2.0)
    return 0
