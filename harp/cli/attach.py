"""`harp attach`: lease devices from the pool and store the lease for `harp.connect()`."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..errors import ArgumentError, HarpError
from ..lease import Lease, default_lease_path
from ..output import emit_json
from .common import (add_scheduler_options, positive_float, positive_int, say, scheduler_client,
                     share, size)
from .leases import show


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", default="", help="device kind (cpu, gpu, fpga, npu) or backend (cuda, opencl, onnx); default: any")
    p.add_argument("--count", type=positive_int, default=1, help="number of devices (default 1)")
    p.add_argument("--memory", type=size, default=0,
                   help="memory quota per device, e.g. 4GiB (default: the whole device)")
    p.add_argument("--share", type=share, default=1.0,
                   help="compute share per device, (0, 1] (default 1)")
    p.add_argument("--same-host", action="store_true", help="only devices on this host")
    p.add_argument("--policy", choices=["spread", "pack"], default="spread")
    p.add_argument("--ttl", type=positive_float, default=None,
                   help="seconds between renewals before the lease expires (default: the "
                        "scheduler's, 600)")
    p.add_argument("--name", default="", help="a note shown in `harp leases`")
    p.add_argument("--save", type=Path, default=None,
                   help=f"where to store the lease (default: $HARP_LEASE or {default_lease_path()})")
    p.add_argument("--replace", action="store_true",
                   help="detach the lease stored there first (else a stored live lease is kept "
                        "and this attach refused)")
    p.add_argument("--json", action="store_true")
    add_scheduler_options(p)


def _stored(path: Path) -> Lease | None:
    if not path.exists():
        return None
    try:
        lease = Lease.load(path)
    except HarpError:
        return None
    return lease if lease.state == "active" and lease.expires_at > time.time() else None


def run(args: argparse.Namespace) -> int:
    path = Path(args.save).expanduser() if args.save else default_lease_path()
    with scheduler_client(args) as scheduler:
        old = _stored(path)
        if old is not None:
            if not args.replace:
                raise ArgumentError(
                    f"{path} holds lease {old.lease_id} already, live for "
                    f"{old.expires_at - time.time():.0f} s more: `harp detach` it first, keep "
                    "both with --save FILE, or --replace it (detaches it)")
            try:
                scheduler.detach(old.lease_id)
            except HarpError as exc:
                say(f"note: could not detach {old.lease_id}: {exc}")
        lease = scheduler.attach(args.kind, count=args.count, memory=args.memory,
                                 share=args.share, same_host=args.same_host, policy=args.policy,
                                 ttl_s=args.ttl or 0.0, client_name=args.name)
    saved = lease.save(path)
    if args.json:
        emit_json(dict(lease.to_dict(), saved_to=str(saved)))
        return 0
    show([lease])
    if args.save is None and not _env_lease():
        print(f"\nlease stored in {saved}; harp.connect() with no arguments opens device 0")
    else:
        print(f"\nlease stored in {saved}; open it with HARP_LEASE={saved} (then harp.connect() "
              f"with no arguments), harp.connect(harp.Lease.load('{saved}')), or "
              f"harp run --lease {saved}")
    return 0


def _env_lease() -> bool:
    import os
    return bool(os.environ.get("HARP_LEASE"))
