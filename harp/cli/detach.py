"""`harp detach`: end a lease; its pool server frees everything the session held."""
from __future__ import annotations

import argparse

from ..errors import LeaseError
from ..lease import Lease, default_lease_path
from .common import add_scheduler_options, scheduler_client
from ..output import emit_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("lease", nargs="?", default=None,
                   help="lease id (default: the stored lease)")
    p.add_argument("--json", action="store_true")
    add_scheduler_options(p)


def run(args: argparse.Namespace) -> int:
    stored = None
    if default_lease_path().exists():
        try:
            stored = Lease.load()
        except LeaseError:
            stored = None
    lease_id = args.lease or (stored.lease_id if stored else None)
    if not lease_id:
        raise LeaseError("no lease given and none stored: harp detach LEASE_ID")
    with scheduler_client(args) as scheduler:
        lease = scheduler.detach(lease_id)
    if stored is not None and stored.lease_id == lease_id:
        default_lease_path().unlink(missing_ok=True)
    if args.json:
        emit_json(lease.to_dict())
    else:
        print(f"lease {lease.lease_id} is {lease.state}")
    return 0
