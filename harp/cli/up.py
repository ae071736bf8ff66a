"""`harp up`: the embedded default for one machine, in the foreground.

A scheduler on SQLite and a pool server for the local cpu device, with the pool
CA and certificates created on first use: the scheduler's and the pool
server's (`HOST-cpu`), a `client` certificate for this machine's user, an
`admin` one for its operator (`harp leases --all`, `harp server drain`), and a
`monitor` one for a Prometheus server (`--metrics-listen`: one endpoint for both
services). Ctrl-C stops everything cleanly.
"""
from __future__ import annotations

import argparse
import re
import socket
from pathlib import Path

from .common import (add_metrics_options, listen_address, metrics_endpoint, positive_float, say,
                     size, start_metrics, wait_for_signal)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=None,
                   help="scheduler database, key and pool socket (default: $HARP_DATA_DIR or "
                        "~/.local/share/harp)")
    p.add_argument("--cert-dir", type=Path, default=None,
                   help="certificates (default: $HARP_CERT_DIR or ~/.config/harp/certs)")
    p.add_argument("--scheduler-listen", default="127.0.0.1:50050", type=listen_address)
    p.add_argument("--server-listen", default="127.0.0.1:50051", type=listen_address)
    p.add_argument("--memory", default="4GiB", type=size,
                   help="memory of the cpu device (default 4GiB)")
    p.add_argument("--heartbeat", type=positive_float, default=2.0)
    p.add_argument("--trust-client-code", action="store_true",
                   help="let the pool server run kernels sent as source (numba programs "
                        "under `harp run` on the cpu device): development only")
    p.add_argument("--isolation", choices=["process", "thread"], default="process",
                   help="sessions in worker processes (default) or in the server's own "
                        "(development only)")
    add_metrics_options(p)


def pool_server_name() -> str:
    """This machine's pool server name (a certificate name: letters, digits, . _ -)."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).lstrip(".-") or "host"
    return f"{host}-cpu"


def ensure_certs(cert_dir: Path) -> None:
    """Create the pool CA and this host's certificates where missing."""
    from harp import security
    if not (cert_dir / security.CA_CERT).exists():
        security.init_ca(cert_dir)
        say(f"created pool CA in {cert_dir}")
    wanted = (("server", "server", [socket.gethostname()]),
              ("server", pool_server_name(), [socket.gethostname()]),
              ("client", "client", []), ("admin", "admin", []), ("monitor", "monitor", []))
    for role, name, sans in wanted:
        if not (cert_dir / f"{name}.pem").exists():
            security.issue(cert_dir, role, name, sans=sans)


def run(args: argparse.Namespace) -> int:
    from harp.lease import data_dir
    from harp.security import default_cert_dir
    from .scheduler import start_scheduler
    from .server import add_serve_arguments, start_pool_server

    data = args.data_dir or data_dir()
    certs = args.cert_dir or default_cert_dir()
    ensure_certs(certs)
    tls = dict(insecure=False, cert_dir=str(certs), tls_ca=None, tls_cert=None, tls_key=None)
    metrics = metrics_endpoint(argparse.Namespace(
        **tls, cert_name="server", metrics_listen=args.metrics_listen,
        metrics_insecure=args.metrics_insecure))
    scheduler = start_scheduler(argparse.Namespace(
        **tls, cert_name="server", data_dir=data, listen=[args.scheduler_listen],
        heartbeat=args.heartbeat, down_after=None, default_ttl=600.0, token_ttl=60.0))
    scheduler_url = f"harp://{scheduler.addresses[0]}"
    data.mkdir(parents=True, exist_ok=True)
    sock = data / "pool-cpu.sock"
    sock.unlink(missing_ok=True)
    serve = argparse.ArgumentParser()
    add_serve_arguments(serve)
    server_args = serve.parse_args([])
    server_args.__dict__.update(
        **tls, cert_name=pool_server_name(), backend="cpu",
        listen=[args.server_listen, f"unix:{sock}"], scheduler=scheduler_url,
        trust_client_code=args.trust_client_code, memory=args.memory,
        isolation=args.isolation)
    servers = []
    try:
        server, registrar, endpoints = start_pool_server(server_args)
        servers.append((server, registrar))
        say(f"HARP is up: scheduler {scheduler_url}, pool server {server.name} "
            f"on {', '.join(endpoints)}")
        say(f"  HARP_SCHEDULER={scheduler_url} harp attach --kind cpu   # then harp.connect()")
        if metrics is not None:
            from harp.scheduler.metrics import register
            from harp.server.metrics import PoolCollector
            register(scheduler, metrics.registry)
            metrics.registry.register(PoolCollector(server))
            start_metrics(metrics)
        wait_for_signal()
    finally:
        say("stopping")
        if metrics is not None:
            metrics.stop()
        for server, registrar in servers:
            if registrar is not None:
                registrar.stop()
            server.stop(grace=2.0)
        scheduler.stop()
    return 0
