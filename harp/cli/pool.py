"""`harp pool ls`: the pool's servers, their devices, state and load, and sessions."""
from __future__ import annotations

import argparse
import time

from ..output import emit_json, table
from ..units import format_size
from .common import add_scheduler_options, scheduler_client


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("ls", help="list servers and devices, and the sessions you may see "
                                   "(yours; an admin's certificate: all)")
    ls.add_argument("--json", action="store_true")
    add_scheduler_options(ls)


def run(args: argparse.Namespace) -> int:
    with scheduler_client(args, admin=True) as scheduler:
        servers = scheduler.pool()
    if args.json:
        emit_json(servers)
        return 0
    rows = []
    now = time.time()
    for s in servers:
        for d in s["devices"] or [{"index": "-", "kind": "-", "name": "(no devices)",
                                   "memory": 0}]:
            rows.append([s["name"], s["state"], d["index"], d["kind"], d["name"],
                         format_size(d["memory"]), s["leases"], s["sessions"],
                         format_size(s["memory_used"]), f"{now - s['last_heartbeat']:.0f}s ago",
                         ", ".join(s["endpoints"])])
    table(["server", "state", "dev", "kind", "name", "memory", "leases", "sessions", "used",
           "heartbeat", "endpoints"], rows)
    sessions = [(s["name"], x) for s in servers for x in s.get("session_stats", [])]
    if sessions:
        print()
        table(["server", "session", "identity", "lease", "dev", "share", "device time",
               "memory", "in", "out", "idle"],
              [[name, x["session"], x["identity"], x["lease_id"] or "-", x["device"],
                f"{x['share']:g}", f"{x['device_time_s']:.2f}s", format_size(x["memory_used"]),
                format_size(x["bytes_in"]), format_size(x["bytes_out"]), f"{x['idle_s']:.0f}s"]
               for name, x in sessions])
    return 0
