"""`harp leases`: your leases (an admin: everyone's), who holds them and on which devices."""
from __future__ import annotations

import argparse
import time

from ..output import emit_json, table
from ..units import format_size
from .common import add_scheduler_options, scheduler_client


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all", action="store_true",
                   help="every identity's leases (admins only); default: yours")
    p.add_argument("--ended", action="store_true", help="include ended, expired and lost leases")
    p.add_argument("--json", action="store_true")
    add_scheduler_options(p)


def show(leases: list) -> None:
    now = time.time()
    if not leases:
        print("no leases")
        return
    table(["lease", "state", "owner", "devices", "memory", "share", "expires", "name", "reason"],
          [[x.lease_id, x.state, x.owner or "-",
            ", ".join(f"{d.server}/{d.index}" for d in x.devices),
            format_size(x.memory) if x.memory else "whole device", f"{x.share:g}",
            f"in {x.expires_at - now:.0f}s" if x.state == "active" else "-",
            x.client_name or "-", x.reason or "-"] for x in leases])


def run(args: argparse.Namespace) -> int:
    with scheduler_client(args, admin=args.all) as scheduler:
        leases = scheduler.leases(include_ended=args.ended, everyone=args.all)
    if args.json:
        emit_json([x.to_dict() for x in leases])
    else:
        show(leases)
    return 0
