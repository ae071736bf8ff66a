"""The HARP scheduler: leases, placement, the registry of pool servers, and their store."""
from __future__ import annotations

from .service import Scheduler, open_scheduler
from .sqlite import SqliteStore
from .store import Store

__all__ = ["Scheduler", "open_scheduler", "SqliteStore", "Store"]
