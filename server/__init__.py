"""The HARP pool server: sessions, handle tables, dispatch and the gRPC service."""
from __future__ import annotations

from .service import Grant, PoolServer, open_authorizer
from .session import Session

__all__ = ["PoolServer", "Grant", "open_authorizer", "Session"]
