"""The HARP client: remote devices over gRPC, and connecting to them."""
from __future__ import annotations

from .connect import connect_remote, parse_address
from .remote import RemoteDevice

__all__ = ["connect_remote", "parse_address", "RemoteDevice"]
