"""`harp.connect`: the one entry point from an address to a `Device`.

    harp.connect("local:cpu")          # the cpu backend in this process (the local fast path)
    harp.connect("local:cuda:1")       # any installed backend, by name and device index
    harp.connect("harp://host:port")   # a device on a pool server (see harp.client)
    harp.connect(lease)                # device 0 of a lease from the scheduler (harp attach)
    harp.connect("lease:/path/lease.json")   # the same, from a lease file

Without an address, `HARP_DEVICE` names one, else the lease `harp attach` stored
(`$HARP_LEASE` or ~/.config/harp/lease.json).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable

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


def _traced(open_device: Callable[..., Device]) -> Callable[..., Device]:
    """`trace=PATH` (else `$HARP_TRACE`; `trace=False` turns it off) wraps the device in a
    `harp.trace` recorder writing PATH; `trace_payloads=True` (else `$HARP_TRACE_PAYLOADS`)
    also stores the bytes of every write, so a replay can check what it reads."""
    @functools.wraps(open_device)
    def connect(target: str | None = None, *, trace: Any = None, trace_payloads: bool | None = None,
                **options: Any) -> Device:
        path = (os.environ.get("HARP_TRACE") or None) if trace is None else trace
        device = open_device(target, **options)
        if not path:
            return device
        try:
            from harp.trace import record_to
            return record_to(device, path, payloads=trace_payloads,
                             meta={"target": target if isinstance(target, str) else None})
        except BaseException:
            device.close()
            raise
    return connect


@_traced
def connect(target: str | None = None, **options: Any) -> Device:
    """Open a session on the device that `target` names.

    For `local:` targets, options go to the backend (`memory`) and to the
    session (`memory_quota`, `trust_client_code`); the returned object is the
    backend's own device, with nothing in between. For `harp://` targets see
    `harp.client.connect_remote`. Any target: `trace=PATH` records the session (harp.trace).
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
    if isinstance(target, str) and target.startswith("lease:"):
        if not target[len("lease:"):]:
            raise ArgumentError("a lease address is lease:PATH (a lease file), got 'lease:'")
        target = Lease.load(Path(target[len("lease:"):]))
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
    raise ArgumentError(f"unknown device address {target!r}: expected local:BACKEND[:INDEX], "
                        "harp://HOST:PORT or lease:PATH")
