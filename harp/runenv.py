"""The environment `harp run` hands a program (the names its start-up hook reads too), and
the device it names (`open_from_env`, for the numba.cuda shim and torch's `harp` device).

`harp/runhook.py` is copied into site-packages and runs before anything else
is importable, so it spells these names itself; a test keeps the two in step.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .device import Device

#: The device `harp run` attaches: local:BACKEND[:INDEX], harp://..., lease:PATH, or "lease".
ENV_DEVICE = "HARP_RUN_DEVICE"
#: Trace file for the program's sessions (`harp run --trace`).
ENV_TRACE = "HARP_RUN_TRACE"
#: Client certificate directory for harp:// devices (`harp run --cert-dir`).
ENV_CERT_DIR = "HARP_RUN_CERT_DIR"


def _claim_trace(path: str) -> str:
    """The trace file for this process: `path` for the first process of a `harp run`
    that opens a session, `stem.PID.harptrace` beside it for the others (children)."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        suffix = p.suffix or ".harptrace"
        stem = p.name[:-len(p.suffix)] if p.suffix else p.name
        return str(p.with_name(f"{stem}.{os.getpid()}{suffix}"))
    os.close(fd)
    return str(p)


def open_from_env(environ: Any = None, *, trace: bool = True) -> tuple[Device, str]:
    """Open the device `harp run` named (`HARP_RUN_DEVICE`), else `connect()`'s default.

    Local targets are opened with `trust_client_code=True`: the numba-python kernels
    a local cpu device runs are this process's own code. `environ`: where to read the
    variables (default `os.environ`); `trace=False` records nothing (`harp run`'s check).
    """
    from .connection import connect
    env = os.environ if environ is None else environ
    target = env.get(ENV_DEVICE) or env.get("HARP_DEVICE") or None
    options: dict[str, Any] = {}
    trace_to = env.get(ENV_TRACE) if trace else None
    if trace_to:
        options["trace"] = _claim_trace(trace_to)
    elif not trace:
        options["trace"] = False
    if target is None or target == "lease":
        return connect(**options), "the stored lease"
    if target.startswith("lease:"):
        from .lease import Lease
        return connect(Lease.load(Path(target[len("lease:"):])), **options), target
    if target.startswith("local:"):
        return connect(target, trust_client_code=True, **options), target
    if env.get(ENV_CERT_DIR):
        options["cert_dir"] = env[ENV_CERT_DIR]
    return connect(target, **options), target
