"""The scheduler's state, behind one backend-neutral interface.

`Store` is what the service asks of a database: servers and their devices,
leases, placement in one transaction, the reaper's sweep. Two implementations
share their SQL (`sqlstore.SqlStore`): `sqlite.SqliteStore`, the default (one file
in the data directory, nothing to set up), and `postgres.PostgresStore`, which
several scheduler replicas share; there every change is fenced by the leader's
term (`term`), so a replica that no longer leads cannot commit.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from .placement import Request


@dataclass
class LeaseRecord:
    """A lease as stored."""
    id: str
    state: str
    created_at: float
    expires_at: float
    ttl: float
    memory: int
    share: float
    client_name: str
    reason: str = ""
    devices: list[dict[str, Any]] = field(default_factory=list)  # server, index, memory, share
    owner: str = ""
    term: int = 0            # the leader's term that last changed it (0: a single scheduler)

    @property
    def servers(self) -> list[str]:
        return sorted({d["server"] for d in self.devices})


class Store(ABC):
    """The scheduler's state. Every method that changes it runs in one transaction; in a
    replicated store that transaction also checks that `term` still leads, else it
    raises `NotLeaderError` and changes nothing."""

    #: The leadership term this store writes under: 0 for a single scheduler, None while
    #: a replica does not lead (then every change is refused).
    term: int | None = 0

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the state lives, for logs (no password)."""

    @abstractmethod
    def close(self) -> None:
        """Release the database."""

    def leader(self) -> dict[str, Any]:
        """Who leads the replicas: term, leader (replica name), address, started_at. A
        single scheduler has no leadership row; it leads itself."""
        return {"term": 0, "leader": "", "address": "", "started_at": 0.0}

    def not_leader_message(self) -> str:
        """Why this replica refuses changes, naming the leader where known."""
        return "this scheduler does not lead"

    # -- servers ------------------------------------------------------------------------
    @abstractmethod
    def register(self, name: str, instance: str, host: str, endpoints: list[str],
                 devices: list[tuple[int, str, int, dict]], now: float) -> list[str]:
        """Add or refresh a server and its devices; return the leases its restart lost."""

    @abstractmethod
    def heartbeat(self, name: str, instance: str, sessions: int, memory_used: int,
                  lease_ids: list[str], now: float, session_stats: list[dict] | None = None
                  ) -> tuple[list[LeaseRecord | None], bool, bool]:
        """Record a heartbeat; return the named leases, whether draining, whether unknown."""

    @abstractmethod
    def drain(self, server: str, undo: bool) -> dict[str, Any] | None:
        """Take a server out of placement (or back in); None if there is no such server."""

    @abstractmethod
    def servers(self) -> list[dict[str, Any]]:
        """Every registered server with its devices, load and active lease count."""

    @abstractmethod
    def counts(self, table: str) -> dict[str, int]:
        """How many leases (`table="leases"`) or servers (`"servers"`) are in each state."""

    # -- leases ---------------------------------------------------------------------------
    @abstractmethod
    def attach(self, request: Request, ttl: float, client_name: str, now: float,
               owner: str = "", request_id: str = "") -> LeaseRecord:
        """Place and record a new lease atomically, or raise why it cannot be placed. A
        repeated `request_id` of the same owner returns the lease it made the first time."""

    @abstractmethod
    def renew(self, lease_id: str, now: float) -> LeaseRecord:
        """Extend an active lease by its ttl, or raise `LeaseError` saying why not."""

    @abstractmethod
    def detach(self, lease_id: str, now: float) -> LeaseRecord:
        """End a lease (idempotent); return it as it now stands."""

    @abstractmethod
    def lease(self, lease_id: str) -> LeaseRecord | None:
        """One lease, or None."""

    @abstractmethod
    def leases(self, include_ended: bool = False, owner: str | None = None) -> list[LeaseRecord]:
        """Active leases (`include_ended`: all), of one owner or (None) of everyone."""

    # -- the reaper -------------------------------------------------------------------------
    @abstractmethod
    def reap(self, now: float, down_after: float) -> dict[str, list[str]]:
        """Mark silent servers down (their leases lost) and overdue leases expired."""

    @abstractmethod
    def forgive_silence(self, now: float, grace: float = 0.0) -> None:
        """Count a scheduler's own absence (a restart, a failover) against no server."""


def now() -> float:
    return time.time()
