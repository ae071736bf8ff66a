"""The HARP pool server: admission, session hosts (worker processes), dispatch, gRPC service.

Exports are loaded on first use, so a worker's fork server can import
`harp.server.worker` without gRPC.
"""
from __future__ import annotations

from typing import Any

__all__ = ["PoolServer", "Grant", "open_authorizer", "Session"]


def __getattr__(name: str) -> Any:
    if name in ("PoolServer", "Grant", "open_authorizer"):
        from . import service
        return getattr(service, name)
    if name == "Session":
        from .session import Session
        return Session
    raise AttributeError(f"module 'harp.server' has no attribute {name!r}")
