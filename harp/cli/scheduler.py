"""`harp scheduler serve`: the scheduler that attaches pool devices to clients."""
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
    add_tls_server_options(serve, "server")
    add_metrics_options(serve)


def start_scheduler(args: argparse.Namespace):  # noqa: ANN201 - a harp.scheduler.Scheduler
    from harp.lease import data_dir
    from harp.scheduler import open_scheduler
    scheduler = open_scheduler(args.data_dir or data_dir(), heartbeat_s=args.heartbeat,
                               down_after_s=args.down_after, default_ttl_s=args.default_ttl,
                               token_ttl_s=getattr(args, "token_ttl", 60.0))
    scheduler.start(args.listen or ["127.0.0.1:50050"], server_credentials(args))
    return scheduler


def run(args: argparse.Namespace) -> int:
    metrics = metrics_endpoint(args)
    scheduler = start_scheduler(args)
    scheme = "harp+insecure" if args.insecure else "harp"
    for address in scheduler.addresses:
        say(f"HARP scheduler listening on {scheme}://{address} (database {scheduler.store.path})")
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
