"""`harp scheduler serve`: the scheduler that attaches pool devices to clients.

On SQLite by default; `--store postgresql://...` makes it one of several replicas
that share that database, one leading at a time (docs/replicas.md)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import (add_metrics_options, add_tls_server_options, listen_address,
                     metrics_endpoint, positive_float, say, server_credentials, start_metrics,
                     wait_for_signal)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    serve = sub.add_parser("serve", help="run the scheduler until interrupted")
    serve.add_argument("--listen", action="append", default=[], type=listen_address,
                       help="address to listen on (repeatable; default 127.0.0.1:50050)")
    serve.add_argument("--data-dir", type=Path, default=None,
                       help="database and signing key (default: $HARP_DATA_DIR or "
                            "~/.local/share/harp)")
    serve.add_argument("--heartbeat", type=positive_float, default=5.0,
                       help="seconds between pool server heartbeats (default 5)")
    serve.add_argument("--down-after", type=positive_float, default=None,
                       help="seconds of silence before a server is down (default 3 heartbeats)")
    serve.add_argument("--default-ttl", type=positive_float, default=600.0,
                       help="lease lifetime between renewals, seconds (default 600)")
    serve.add_argument("--token-ttl", type=positive_float, default=60.0,
                       help="lifetime of a lease token, seconds (default 60): a detached lease's "
                            "token is refused by a pool server that missed the news within this")
    serve.add_argument("--store", type=store, default="",
                       help="where state lives: sqlite (default: DATA_DIR/scheduler.sqlite3), "
                            "sqlite:PATH, or a PostgreSQL database that replicas share: "
                            "postgresql://USER@HOST/DB, postgresql:///DB?host=/run/postgresql, "
                            "'host=/tmp dbname=harp'")
    serve.add_argument("--signing-key", type=Path, default=None,
                       help="Ed25519 key that signs lease tokens, created (0600) if missing "
                            "(default: DATA_DIR/scheduler-signing.key); every replica needs "
                            "the same one")
    serve.add_argument("--advertise", type=scheduler_url, default=None,
                       help="address clients reach this replica at while it leads (default: "
                            "the first listen address)")
    serve.add_argument("--failover-timeout", type=positive_float, default=5.0,
                       help="replicas: seconds a frozen leader keeps the lead before a "
                            "follower takes over (default 5)")
    add_tls_server_options(serve, "server")
    add_metrics_options(serve)


def store(text: str) -> str:
    """A --store value, checked for its form (the database is reached at start)."""
    from harp.errors import ArgumentError
    from harp.scheduler.service import store_location
    try:
        store_location(text)
    except ArgumentError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def scheduler_url(text: str) -> str:
    """harp://HOST:PORT or harp+insecure://HOST:PORT, as a client dials it."""
    if not text.startswith(("harp://", "harp+insecure://")) or \
            not text.partition("://")[2]:
        raise argparse.ArgumentTypeError(f"{text!r} is not harp://HOST:PORT (or "
                                         "harp+insecure://HOST:PORT)")
    return text


def start_scheduler(args: argparse.Namespace):  # noqa: ANN201 - a harp.scheduler.Scheduler
    from harp.lease import data_dir
    from harp.scheduler import open_scheduler
    scheduler = open_scheduler(args.data_dir or data_dir(), heartbeat_s=args.heartbeat,
                               down_after_s=args.down_after, default_ttl_s=args.default_ttl,
                               token_ttl_s=getattr(args, "token_ttl", 60.0),
                               store=getattr(args, "store", ""),
                               signing_key=getattr(args, "signing_key", None),
                               advertise=getattr(args, "advertise", None) or "",
                               failover_timeout_s=getattr(args, "failover_timeout", 5.0))
    scheduler.start(args.listen or ["127.0.0.1:50050"], server_credentials(args))
    return scheduler


def run(args: argparse.Namespace) -> int:
    metrics = metrics_endpoint(args)
    scheduler = start_scheduler(args)
    scheme = "harp+insecure" if args.insecure else "harp"
    for address in scheduler.addresses:
        say(f"HARP scheduler listening on {scheme}://{address} (database "
            f"{scheduler.store.location}"
            + (f"; a replica, leading when elected as {scheduler.advertise})"
               if scheduler.leadership is not None else ")"))
    try:
        if metrics is not None:
            from harp.scheduler.metrics import register
            register(scheduler, metrics.registry)
            start_metrics(metrics)
        wait_for_signal()
    finally:
        if metrics is not None:
            metrics.stop()
        scheduler.stop()
    return 0
