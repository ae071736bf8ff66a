"""`harp up`: the embedded default for one machine, in the foreground.

A scheduler on SQLite and a pool server for the local cpu device (and for
CUDA GPUs once a `cuda` backend is installed and sees one), with the pool CA
and certificates created on first use. Ctrl-C stops everything cleanly.
"""
from __future__ import annotations

import argparse
import socket
from pathlib import Path

from .common import wait_for_signal


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=None,
                   help="scheduler database, key and pool socket (default: $HARP_DATA_DIR or "
                        "~/.local/share/harp)")
    p.add_argument("--cert-dir", type=Path, default=None,
                   help="certificates (default: $HARP_CERT_DIR or ~/.config/harp/certs)")
    p.add_argument("--scheduler-listen", default="127.0.0.1:50050")
    p.add_argument("--server-listen", default="127.0.0.1:50051")
    p.add_argument("--memory", default="4GiB", help="memory of the cpu device (default 4GiB)")
    p.add_argument("--heartbeat", type=float, default=2.0)


def ensure_certs(cert_dir: Path) -> None:
    """Create the pool CA and this host's server and client certificates if missing."""
    from harp import security
    if not (cert_dir / security.CA_CERT).exists():
        security.init_ca(cert_dir)
        print(f"created pool CA in {cert_dir}")
    if not (cert_dir / "server.pem").exists():
        security.issue(cert_dir, "server", "server", sans=[socket.gethostname()])
    if not (cert_dir / "client.pem").exists():
        security.issue(cert_dir, "client", "client")


def run(args: argparse.Namespace) -> int:
    from harp.lease import data_dir
    from harp.security import default_cert_dir
    from .scheduler import start_scheduler
    from .server import start_pool_server

    data = args.data_dir or data_dir()
    certs = args.cert_dir or default_cert_dir()
    ensure_certs(certs)
    base = dict(insecure=False, cert_dir=str(certs), tls_ca=None, tls_cert=None, tls_key=None,
                cert_name="server")
    scheduler = start_scheduler(argparse.Namespace(
        **base, data_dir=data, listen=[args.scheduler_listen], heartbeat=args.heartbeat,
        down_after=None, default_ttl=600.0))
    scheduler_url = f"harp://{scheduler.addresses[0]}"
    data.mkdir(parents=True, exist_ok=True)
    sock = data / "pool-cpu.sock"
    sock.unlink(missing_ok=True)
    servers = []
    try:
        server, registrar, endpoints = start_pool_server(argparse.Namespace(
            **base, backend="cpu", listen=[args.server_listen, f"unix:{sock}"], name="",
            scheduler=scheduler_url, advertise=[], trust_client_code=False, memory=args.memory,
            devices=1, max_sessions=64, trace_dir=None), name=f"{socket.gethostname()}-cpu")
        servers.append((server, registrar))
        print(f"HARP is up: scheduler {scheduler_url}, pool server {server.name} "
              f"on {', '.join(endpoints)}", flush=True)
        print(f"  HARP_SCHEDULER={scheduler_url} harp attach --kind cpu   # then harp.connect()",
              flush=True)
        wait_for_signal()
    finally:
        print("stopping", flush=True)
        for server, registrar in servers:
            if registrar is not None:
                registrar.stop()
            server.stop(grace=2.0)
        scheduler.stop()
    return 0
