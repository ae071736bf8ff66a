"""The HARP client: remote devices over gRPC, and connecting to them."""
from __future__ import annotations

from .address import parse_address
from .connect import connect_lease, connect_remote
from .pool import SchedulerClient
from .remote import RemoteDevice

__all__ = ["connect_remote", "connect_lease", "parse_address", "RemoteDevice", "SchedulerClient"]
