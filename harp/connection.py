"""`harp.connect`: the one entry point from an address to a `Device`.

    harp.connect("local:cpu")          # the cpu backend in this process (the local fast path)
    harp.connect("local:cuda:1")       # any installed backend, by name and device index
    harp.connect("harp://host:port")   # a device on a pool server (see harp.client)
    harp.connect(lease)                # device 0 of a lease from the scheduler (harp attach)

Without an address, `HARP_DEVICE` names one, else the lease `harp attach` stored
(`$HARP_LEASE` or ~/.config/harp/lease.json).
"""
from __future__ import annotations

import os
from typing import Any

from .device import Device
from .errors import ArgumentError


def parse_local(target: str) -> tuple[str, int]:
    """("cuda", 1) from "local:cuda:1"; the index defaults to 0."""
    parts = target.split(":")
    if len(parts) not in (2, 3) or parts[0] != "local" or not parts[1]:
        raise ArgumentError(f"a local device is local:BACKEND[:INDEX], got {target!r}")
    try:
        index = int(parts[2]) if len(parts) == 3 else 0
    except ValueError:
        raise ArgumentError(f"device index must be an int in {target!r}") from None
    return parts[1], index


def connect(target: str | None = None, **options: Any) -> Device:
    """Open a session on the device that `target` names.

    For `local:` targets, options go to the backend (`memory`) and to the
    session (`memory_quota`, `trust_client_code`); the returned object is the
    backend's own device, with nothing in between. For `harp://` targets see
    `harp.client.connect_remote`.
    """
    if target is None:
        target = os.environ.get("HARP_DEVICE")
        if not target:
            from .lease import Lease, default_lease_path
            if not default_lease_path().exists():
                raise ArgumentError("harp.connect() needs a device address (local:cpu, "
                                    "harp://host:port), HARP_DEVICE, or a lease from "
                                    "`harp attach`")
            target = Lease.load()
    from .lease import Lease
    if isinstance(target, Lease):
        from harp.client import connect_lease
        return connect_lease(target, **options)
    if not isinstance(target, str):
        raise TypeError(f"a device address is a str, got {type(target).__name__}")
    if target.startswith("local:"):
        from .backends import load_backend
        name, index = parse_local(target)
        session = {k: options.pop(k) for k in ("memory_quota", "trust_client_code")
                   if k in options}
        return load_backend(name, **options).open(index, **session)
    if target.startswith(("harp://", "harp+insecure://", "unix:")):
        from harp.client import connect_remote
        return connect_remote(target, **options)
    raise ArgumentError(f"unknown device address {target!r}: expected local:BACKEND[:INDEX] "
                        "or harp://HOST:PORT")
