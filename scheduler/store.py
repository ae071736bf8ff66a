"""Scheduler state in a real database, behind one interface.

`SqliteStore` is the default: one file in the data directory, nothing to set
up. Every change runs in an IMMEDIATE transaction, so concurrent attaches
(threads of one scheduler, or several schedulers on one file) are serialized
and a device is never handed out beyond its memory and compute share.
"""
from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from harp.errors import LeaseError

from .placement import Candidate, Request, choose

SCHEMA = """
CREATE TABLE IF NOT EXISTS servers (
    name TEXT PRIMARY KEY,
    instance TEXT NOT NULL,
    host TEXT NOT NULL,
    endpoints TEXT NOT NULL,           -- JSON list
    state TEXT NOT NULL,               -- up | down | draining
    last_heartbeat REAL NOT NULL,
    sessions INTEGER NOT NULL DEFAULT 0,
    memory_used INTEGER NOT NULL DEFAULT 0,
    session_stats TEXT NOT NULL DEFAULT '[]'   -- JSON: its open sessions, from the heartbeat
);
CREATE TABLE IF NOT EXISTS devices (
    server TEXT NOT NULL REFERENCES servers(name),
    idx INTEGER NOT NULL,
    kind TEXT NOT NULL,
    facts TEXT NOT NULL,               -- JSON DeviceInfo
    memory INTEGER NOT NULL,
    PRIMARY KEY (server, idx)
);
CREATE TABLE IF NOT EXISTS leases (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,               -- active | ended | expired | lost
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    ttl REAL NOT NULL,
    memory INTEGER NOT NULL,
    share REAL NOT NULL,
    client_name TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    owner TEXT NOT NULL DEFAULT ''     -- the identity that attached it
);
CREATE TABLE IF NOT EXISTS lease_devices (
    lease_id TEXT NOT NULL REFERENCES leases(id),
    server TEXT NOT NULL,
    idx INTEGER NOT NULL,
    memory INTEGER NOT NULL,
    share REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS lease_devices_by_device ON lease_devices (server, idx);
"""

#: Columns added since the first schema: (table, column, definition), added when missing.
MIGRATIONS = (
    ("leases", "owner", "TEXT NOT NULL DEFAULT ''"),
    ("servers", "session_stats", "TEXT NOT NULL DEFAULT '[]'"),
)


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

    @property
    def servers(self) -> list[str]:
        return sorted({d["server"] for d in self.devices})


class SqliteStore:
    """The scheduler's state in one SQLite file (or ":memory:")."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                   timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            for table, column, definition in MIGRATIONS:
                have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- servers -------------------------------------------------------------------
    def register(self, name: str, instance: str, host: str, endpoints: list[str],
                 devices: list[tuple[int, str, int, dict]], now: float) -> list[str]:
        """Add or refresh a server and its devices. A new instance of a known server
        means it restarted: its sessions are gone, so its active leases are lost."""
        with self._tx() as db:
            row = db.execute("SELECT instance, state FROM servers WHERE name=?", (name,)).fetchone()
            lost: list[str] = []
            if row is not None and row["instance"] != instance:
                lost = self._lose_leases(db, name, f"server {name} restarted", now)
            state = "draining" if row is not None and row["state"] == "draining" else "up"
            db.execute("INSERT INTO servers (name, instance, host, endpoints, state, last_heartbeat)"
                       " VALUES (?,?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET instance=excluded."
                       "instance, host=excluded.host, endpoints=excluded.endpoints, "
                       "state=excluded.state, last_heartbeat=excluded.last_heartbeat",
                       (name, instance, host, json.dumps(endpoints), state, now))
            db.execute("DELETE FROM devices WHERE server=?", (name,))
            db.executemany("INSERT INTO devices (server, idx, kind, facts, memory) VALUES "
                           "(?,?,?,?,?)", [(name, i, kind, json.dumps(facts), mem)
                                           for i, kind, mem, facts in devices])
            return lost

    def heartbeat(self, name: str, instance: str, sessions: int, memory_used: int,
                  lease_ids: list[str], now: float, session_stats: list[dict] | None = None
                  ) -> tuple[list[LeaseRecord | None], bool, bool]:
        """Record a heartbeat; return the named leases, whether draining, whether unknown."""
        with self._tx() as db:
            row = db.execute("SELECT instance, state FROM servers WHERE name=?", (name,)).fetchone()
            if row is None or row["instance"] != instance:
                return [], False, True
            state = "draining" if row["state"] == "draining" else "up"
            db.execute("UPDATE servers SET last_heartbeat=?, sessions=?, memory_used=?, state=?, "
                       "session_stats=? WHERE name=?",
                       (now, sessions, memory_used, state, json.dumps(session_stats or []), name))
            return ([self._lease(db, lid) for lid in lease_ids], state == "draining", False)

    def drain(self, server: str, undo: bool) -> dict[str, Any] | None:
        with self._tx() as db:
            row = self._find_server(db, server)
            if row is None:
                return None
            if row["state"] != "down":
                db.execute("UPDATE servers SET state=? WHERE name=?",
                           ("up" if undo else "draining", row["name"]))
            return self._server_dict(db, self._find_server(db, row["name"]))

    def servers(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM servers ORDER BY name").fetchall()
            return [self._server_dict(self._db, r) for r in rows]

    def counts(self, table: str) -> dict[str, int]:
        """How many leases (`table="leases"`) or servers (`"servers"`) are in each state."""
        if table not in ("leases", "servers"):
            raise ValueError(f"no states to count in {table!r}")
        with self._lock:
            rows = self._db.execute(f"SELECT state, COUNT(*) FROM {table} GROUP BY state")
            return {state: n for state, n in rows.fetchall()}

    @staticmethod
    def _find_server(db: sqlite3.Connection, server: str) -> sqlite3.Row | None:
        row = db.execute("SELECT * FROM servers WHERE name=?", (server,)).fetchone()
        if row is None:
            for r in db.execute("SELECT * FROM servers").fetchall():
                if server in json.loads(r["endpoints"]) or \
                        any(e.endswith("://" + server) for e in json.loads(r["endpoints"])):
                    return r
        return row

    @staticmethod
    def _server_dict(db: sqlite3.Connection, row: sqlite3.Row) -> dict[str, Any]:
        devices = [{"index": d["idx"], "kind": d["kind"], "memory": d["memory"],
                    "facts": json.loads(d["facts"])}
                   for d in db.execute("SELECT * FROM devices WHERE server=? ORDER BY idx",
                                       (row["name"],))]
        leases = db.execute("SELECT COUNT(DISTINCT l.id) FROM leases l JOIN lease_devices d ON "
                            "d.lease_id=l.id WHERE d.server=? AND l.state='active'",
                            (row["name"],)).fetchone()[0]
        return {"name": row["name"], "host": row["host"], "state": row["state"],
                "endpoints": json.loads(row["endpoints"]), "last_heartbeat": row["last_heartbeat"],
                "sessions": row["sessions"], "memory_used": row["memory_used"],
                "devices": devices, "leases": leases,
                "session_stats": json.loads(row["session_stats"] or "[]")}

    # -- leases --------------------------------------------------------------------
    def attach(self, request: Request, ttl: float, client_name: str, now: float,
               owner: str = "") -> LeaseRecord:
        """Place and record a new lease atomically, or raise why it cannot be placed."""
        with self._tx() as db:
            rows = db.execute(
                "SELECT d.server, d.idx, d.kind, d.memory, d.facts, s.host, s.state, "
                "COALESCE((SELECT SUM(ld.memory) FROM lease_devices ld JOIN leases l ON "
                "l.id=ld.lease_id WHERE l.state='active' AND ld.server=d.server AND "
                "ld.idx=d.idx), 0) AS used_memory, "
                "COALESCE((SELECT SUM(ld.share) FROM lease_devices ld JOIN leases l ON "
                "l.id=ld.lease_id WHERE l.state='active' AND ld.server=d.server AND "
                "ld.idx=d.idx), 0) AS used_share, "
                "(SELECT COUNT(*) FROM lease_devices ld JOIN leases l ON l.id=ld.lease_id "
                "WHERE l.state='active' AND ld.server=d.server AND ld.idx=d.idx) AS leases "
                "FROM devices d JOIN servers s ON s.name=d.server").fetchall()
            candidates = [Candidate(r["server"], r["idx"], r["kind"], r["host"], r["memory"],
                                    r["state"], r["used_memory"], r["used_share"], r["leases"],
                                    _backend_of(r["facts"]))
                          for r in rows]
            chosen = choose(candidates, request)
            lease = LeaseRecord(id=f"lease-{secrets.token_hex(8)}", state="active",
                                created_at=now, expires_at=now + ttl, ttl=ttl,
                                memory=request.memory, share=request.share,
                                client_name=client_name, owner=owner,
                                devices=[{"server": c.server, "index": c.index, "memory": mem,
                                          "share": request.share} for c, mem in chosen])
            db.execute("INSERT INTO leases (id, state, created_at, expires_at, ttl, memory, share,"
                       " client_name, owner) VALUES (?,?,?,?,?,?,?,?,?)",
                       (lease.id, lease.state, now, lease.expires_at, ttl, request.memory,
                        request.share, client_name, owner))
            db.executemany("INSERT INTO lease_devices (lease_id, server, idx, memory, share) "
                           "VALUES (?,?,?,?,?)",
                           [(lease.id, d["server"], d["index"], d["memory"], d["share"])
                            for d in lease.devices])
            return lease

    def renew(self, lease_id: str, now: float) -> LeaseRecord:
        with self._tx() as db:
            lease = self._lease(db, lease_id)
            if lease is None:
                raise LeaseError(f"unknown lease {lease_id}")
            if lease.state != "active":
                raise LeaseError(f"lease {lease_id} is {lease.state}"
                                 + (f": {lease.reason}" if lease.reason else "")
                                 + "; attach a new one (harp attach)")
            if lease.expires_at <= now:
                self._end(db, lease_id, "expired", "not renewed in time", now)
                raise LeaseError(f"lease {lease_id} has expired")
            lease.expires_at = now + lease.ttl
            db.execute("UPDATE leases SET expires_at=? WHERE id=?", (lease.expires_at, lease_id))
            return lease

    def detach(self, lease_id: str, now: float) -> LeaseRecord:
        with self._tx() as db:
            lease = self._lease(db, lease_id)
            if lease is None:
                raise LeaseError(f"unknown lease {lease_id}")
            if lease.state == "active":
                self._end(db, lease_id, "ended", "detached", now)
            return self._lease(db, lease_id)  # type: ignore[return-value]

    def lease(self, lease_id: str) -> LeaseRecord | None:
        with self._lock:
            return self._lease(self._db, lease_id)

    def leases(self, include_ended: bool = False, owner: str | None = None) -> list[LeaseRecord]:
        """Active leases (`include_ended`: all), of one owner or (None) of everyone."""
        where, args = [], []
        if not include_ended:
            where.append("state='active'")
        if owner is not None:
            where.append("owner=?")
            args.append(owner)
        query = "SELECT id FROM leases" + (" WHERE " + " AND ".join(where) if where else "")
        with self._lock:
            ids = [r[0] for r in self._db.execute(query + " ORDER BY created_at", args)]
            return [self._lease(self._db, i) for i in ids]  # type: ignore[misc]

    def reap(self, now: float, down_after: float) -> dict[str, list[str]]:
        """Mark silent servers down (their leases lost) and overdue leases expired."""
        with self._tx() as db:
            down = [r["name"] for r in db.execute(
                "SELECT name FROM servers WHERE state!='down' AND last_heartbeat < ?",
                (now - down_after,))]
            lost: list[str] = []
            for name in down:
                db.execute("UPDATE servers SET state='down', sessions=0, memory_used=0 "
                           "WHERE name=?", (name,))
                lost += self._lose_leases(db, name, f"server {name} is down", now)
            expired = [r["id"] for r in db.execute(
                "SELECT id FROM leases WHERE state='active' AND expires_at < ?", (now,))]
            for lease_id in expired:
                self._end(db, lease_id, "expired", "not renewed in time", now)
            return {"down": down, "lost": lost, "expired": expired}

    def forgive_silence(self, now: float, grace: float = 0.0) -> None:
        """After a scheduler restart, count its own downtime against no server, and give
        each `grace` more seconds to find the scheduler again."""
        with self._tx() as db:
            db.execute("UPDATE servers SET last_heartbeat=? WHERE state!='down'", (now + grace,))

    # -- helpers -------------------------------------------------------------------
    def _lose_leases(self, db: sqlite3.Connection, server: str, reason: str,
                     now: float) -> list[str]:
        ids = [r[0] for r in db.execute(
            "SELECT DISTINCT l.id FROM leases l JOIN lease_devices d ON d.lease_id=l.id "
            "WHERE d.server=? AND l.state='active'", (server,))]
        for lease_id in ids:
            self._end(db, lease_id, "lost", reason, now)
        return ids

    @staticmethod
    def _end(db: sqlite3.Connection, lease_id: str, state: str, reason: str, now: float) -> None:
        db.execute("UPDATE leases SET state=?, reason=?, expires_at=MIN(expires_at, ?) WHERE id=?",
                   (state, reason, now, lease_id))

    @staticmethod
    def _lease(db: sqlite3.Connection, lease_id: str) -> LeaseRecord | None:
        row = db.execute("SELECT * FROM leases WHERE id=?", (lease_id,)).fetchone()
        if row is None:
            return None
        devices = [{"server": d["server"], "index": d["idx"], "memory": d["memory"],
                    "share": d["share"]}
                   for d in db.execute("SELECT * FROM lease_devices WHERE lease_id=?",
                                       (lease_id,))]
        return LeaseRecord(id=row["id"], state=row["state"], created_at=row["created_at"],
                           expires_at=row["expires_at"], ttl=row["ttl"], memory=row["memory"],
                           share=row["share"], client_name=row["client_name"],
                           reason=row["reason"], devices=devices, owner=row["owner"])


def now() -> float:
    return time.time()


def _backend_of(facts: str | None) -> str:
    """The backend name in a device's registered facts (its `DeviceInfo`), or ""."""
    try:
        value = json.loads(facts or "{}").get("backend", "")
    except (ValueError, AttributeError):
        return ""
    return value if isinstance(value, str) else ""
