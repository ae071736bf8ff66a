"""`harp leases`: the pool's leases, who holds them and on which devices."""
from __future__ import annotations

import argparse
import time

from ..units import format_size
from .common import add_scheduler_options, scheduler_client
from ..output import emit_json, table


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all", action="store_true", help="include ended, expired and lost leases")
    p.add_argument("--json", action="store_true")
    add_scheduler_options(p)


def show(leases: list) -> None:
    now = time.time()
    table(["lease", "state", "devices", "memory", "share", "expires", "client", "reason"],
          [[x.lease_id, x.state, ", ".join(f"{d.server}/{d.index}" for d in x.devices),
            format_size(x.memory) if x.memory else "whole", f"{x.share:g}",
            f"in {x.expires_at - now:.0f}s" if x.state == "active" else "-", x.client_name,
            x.reason] for x in leases])


def run(args: argparse.Namespace) -> int:
    with scheduler_client(args) as scheduler:
        leases = scheduler.leases(include_ended=args.all)
    if args.json:
        emit_json([x.to_dict() for x in leases])
    else:
        show(leases)
    return 0
