"""`harp devices`: every backend known here, whether it is available, and its devices."""
from __future__ import annotations

import argparse

from ..backends import list_devices
from ..units import format_size
from ..output import emit_json, table


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON for scripts")


def run(args: argparse.Namespace) -> int:
    rows = list_devices()
    if args.json:
        emit_json(rows)
        return 0
    out = []
    for row in rows:
        if not row["available"]:
            out.append([f"local:{row['backend']}", "-", "unavailable", "-", row["reason"]])
        for d in row["devices"]:
            out.append([f"local:{row['backend']}:{d['index']}", d["kind"], d["name"],
                        format_size(d["memory"]), ", ".join(d["formats"])])
    table(["address", "kind", "name", "memory", "formats / reason"], out)
    return 0
