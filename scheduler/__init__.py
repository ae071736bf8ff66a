"""The HARP scheduler: leases, placement, the registry of pool servers, and their store."""
from __future__ import annotations

from .service import Scheduler, open_scheduler
from .store import SqliteStore

__all__ = ["Scheduler", "open_scheduler", "SqliteStore"]
