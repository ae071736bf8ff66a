"""`harp attach`: lease devices from the pool and store the lease for `harp.connect()`."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..lease import default_lease_path
from ..units import parse_size
from .common import add_scheduler_options, scheduler_client
from ..output import emit_json
from .leases import show


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", default="", help="device kind: cpu, gpu, ... (default: any)")
    p.add_argument("--count", type=int, default=1, help="number of devices (default 1)")
    p.add_argument("--memory", default="0",
                   help="memory quota per device, e.g. 4GiB (default: the whole device)")
    p.add_argument("--share", type=float, default=1.0,
                   help="compute share per device, (0, 1] (default 1)")
    p.add_argument("--same-host", action="store_true", help="only devices on this host")
    p.add_argument("--policy", choices=["spread", "pack"], default="spread")
    p.add_argument("--ttl", type=float, default=0.0,
                   help="seconds between renewals before the lease expires (default: the "
                        "scheduler's, 600)")
    p.add_argument("--name", default="", help="a note shown in `harp leases`")
    p.add_argument("--save", type=Path, default=None,
                   help=f"where to store the lease (default: $HARP_LEASE or {default_lease_path()})")
    p.add_argument("--json", action="store_true")
    add_scheduler_options(p)


def run(args: argparse.Namespace) -> int:
    with scheduler_client(args) as scheduler:
        lease = scheduler.attach(args.kind, count=args.count, memory=parse_size(args.memory),
                                 share=args.share, same_host=args.same_host, policy=args.policy,
                                 ttl_s=args.ttl, client_name=args.name)
    path = lease.save(args.save)
    if args.json:
        emit_json(dict(lease.to_dict(), saved_to=str(path)))
    else:
        show([lease])
        print(f"\nlease stored in {path}; harp.connect() with no arguments opens device 0")
    return 0
