"""The store's operations in SQL, written once for SQLite and PostgreSQL.

A subclass supplies the transactions (`_tx` for changes, `_read` for reads), the
lock that serializes placements (`_lock_placement`) and the errors worth a retry.
Statements use `?` placeholders and SQL both databases speak; each row a change
touches records the term it was written under (`term`).
"""
from __future__ import annotations

import functools
import json
import secrets
import time
from abc import abstractmethod
from contextlib import AbstractContextManager
from typing import Any, Callable, TypeVar

from harp.errors import LeaseError

from .placement import Candidate, Request, choose
from .store import LeaseRecord, Store

#: A change that meets a deadlock or a serialization failure is run again, this many times.
RETRIES = 5

F = TypeVar("F", bound=Callable[..., Any])


class Transaction:
    """An open transaction as the store's SQL sees it: `?` statements, and the term it
    writes under (checked by the store when the transaction began)."""

    def __init__(self, connection: Any, term: int, placeholder: str = "?") -> None:
        self.connection = connection
        self.term = term
        self._placeholder = placeholder

    def _sql(self, sql: str) -> str:
        return sql if self._placeholder == "?" else sql.replace("?", self._placeholder)

    def execute(self, sql: str, args: tuple | list = ()) -> Any:
        """Run one statement; its cursor (rows read by column name)."""
        return self.connection.execute(self._sql(sql), args)

    def executemany(self, sql: str, rows: list[tuple]) -> None:
        """Run one statement once per row of arguments."""
        cursor = self.connection.cursor()
        try:
            cursor.executemany(self._sql(sql), rows)
        finally:
            cursor.close()


def retried(method: F) -> F:
    """Run a change again when the database gave up on it (deadlock, serialization):
    each change is one transaction, so running it again is safe."""
    @functools.wraps(method)
    def again(self: "SqlStore", *args: Any, **kwargs: Any) -> Any:
        for attempt in range(RETRIES):
            try:
                return method(self, *args, **kwargs)
            except self.RETRYABLE:
                if attempt == RETRIES - 1:
                    raise
                time.sleep(0.01 * (attempt + 1) + secrets.randbelow(10) / 1000)
        raise AssertionError("unreachable")
    return again  # type: ignore[return-value]


class SqlStore(Store):
    """`Store` on a SQL database; see the module docstring for what a subclass adds."""

    RETRYABLE: tuple[type[BaseException], ...] = ()

    @abstractmethod
    def _tx(self) -> AbstractContextManager[Transaction]:
        """A transaction for a change, fenced by the store's term."""

    @abstractmethod
    def _read(self) -> AbstractContextManager[Transaction]:
        """A transaction for reading."""

    def _lock_placement(self, db: Transaction) -> None:
        """Serialize placements until `db` ends (no-op where every change is serialized)."""

    # -- servers -------------------------------------------------------------------
    @retried
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
            db.execute("INSERT INTO servers (name, instance, host, endpoints, state, last_heartbeat,"
                       " term) VALUES (?,?,?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET instance="
                       "excluded.instance, host=excluded.host, endpoints=excluded.endpoints, "
                       "state=excluded.state, last_heartbeat=excluded.last_heartbeat, "
                       "term=excluded.term",
                       (name, instance, host, json.dumps(endpoints), state, now, db.term))
            db.execute("DELETE FROM devices WHERE server=?", (name,))
            db.executemany("INSERT INTO devices (server, idx, kind, facts, memory) VALUES "
                           "(?,?,?,?,?)", [(name, i, kind, json.dumps(facts), mem)
                                           for i, kind, mem, facts in devices])
            return lost

    @retried
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
                       "session_stats=?, term=? WHERE name=?",
                       (now, sessions, memory_used, state, json.dumps(session_stats or []),
                        db.term, name))
            return ([self._lease(db, lid) for lid in lease_ids], state == "draining", False)

    @retried
    def drain(self, server: str, undo: bool) -> dict[str, Any] | None:
        with self._tx() as db:
            row = self._find_server(db, server)
            if row is None:
                return None
            if row["state"] != "down":
                db.execute("UPDATE servers SET state=?, term=? WHERE name=?",
                           ("up" if undo else "draining", db.term, row["name"]))
            return self._server_dict(db, self._find_server(db, row["name"]))

    def servers(self) -> list[dict[str, Any]]:
        with self._read() as db:
            rows = db.execute("SELECT * FROM servers ORDER BY name").fetchall()
            return [self._server_dict(db, r) for r in rows]

    def counts(self, table: str) -> dict[str, int]:
        if table not in ("leases", "servers"):
            raise ValueError(f"no states to count in {table!r}")
        with self._read() as db:
            rows = db.execute(f"SELECT state, COUNT(*) AS n FROM {table} GROUP BY state")
            return {row["state"]: int(row["n"]) for row in rows.fetchall()}

    @staticmethod
    def _find_server(db: Transaction, server: str) -> Any:
        row = db.execute("SELECT * FROM servers WHERE name=?", (server,)).fetchone()
        if row is None:
            for r in db.execute("SELECT * FROM servers").fetchall():
                if server in json.loads(r["endpoints"]) or \
                        any(e.endswith("://" + server) for e in json.loads(r["endpoints"])):
                    return r
        return row

    @staticmethod
    def _server_dict(db: Transaction, row: Any) -> dict[str, Any]:
        devices = [{"index": d["idx"], "kind": d["kind"], "memory": int(d["memory"]),
                    "facts": json.loads(d["facts"])}
                   for d in db.execute("SELECT * FROM devices WHERE server=? ORDER BY idx",
                                       (row["name"],)).fetchall()]
        leases = db.execute("SELECT COUNT(DISTINCT l.id) AS n FROM leases l JOIN lease_devices d"
                            " ON d.lease_id=l.id WHERE d.server=? AND l.state='active'",
                            (row["name"],)).fetchone()["n"]
        return {"name": row["name"], "host": row["host"], "state": row["state"],
                "endpoints": json.loads(row["endpoints"]), "last_heartbeat": row["last_heartbeat"],
                "sessions": row["sessions"], "memory_used": row["memory_used"],
                "devices": devices, "leases": leases,
                "session_stats": json.loads(row["session_stats"] or "[]")}

    # -- leases --------------------------------------------------------------------
    @retried
    def attach(self, request: Request, ttl: float, client_name: str, now: float,
               owner: str = "", request_id: str = "") -> LeaseRecord:
        """Place and record a new lease atomically, or raise why it cannot be placed."""
        with self._tx() as db:
            self._lock_placement(db)
            if request_id:
                row = db.execute("SELECT id FROM leases WHERE owner=? AND request_id=?",
                                 (owner, request_id)).fetchone()
                if row is not None:             # a retry of an attach that was recorded
                    return self._lease(db, row["id"])  # type: ignore[return-value]
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
            candidates = [Candidate(r["server"], r["idx"], r["kind"], r["host"], int(r["memory"]),
                                    r["state"], int(r["used_memory"]), float(r["used_share"]),
                                    int(r["leases"]), _backend_of(r["facts"]))
                          for r in rows]
            chosen = choose(candidates, request)
            lease = LeaseRecord(id=f"lease-{secrets.token_hex(8)}", state="active",
                                created_at=now, expires_at=now + ttl, ttl=ttl,
                                memory=request.memory, share=request.share,
                                client_name=client_name, owner=owner, term=db.term,
                                devices=[{"server": c.server, "index": c.index, "memory": mem,
                                          "share": request.share} for c, mem in chosen])
            db.execute("INSERT INTO leases (id, state, created_at, expires_at, ttl, memory, share,"
                       " client_name, owner, term, request_id) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                       (lease.id, lease.state, now, lease.expires_at, ttl, request.memory,
                        request.share, client_name, owner, db.term, request_id))
            db.executemany("INSERT INTO lease_devices (lease_id, server, idx, memory, share) "
                           "VALUES (?,?,?,?,?)",
                           [(lease.id, d["server"], d["index"], d["memory"], d["share"])
                            for d in lease.devices])
            return lease

    @retried
    def renew(self, lease_id: str, now: float) -> LeaseRecord:
        with self._tx() as db:
            lease = self._known_lease(db, lease_id)
            if lease.state != "active":
                raise LeaseError(f"lease {lease_id} is {lease.state}"
                                 + (f": {lease.reason}" if lease.reason else "")
                                 + "; attach a new one (harp attach)")
            expired = lease.expires_at <= now
            if expired:         # recorded (committed) before the refusal, not rolled back
                self._end(db, lease_id, "expired", "not renewed in time", now)
            else:
                lease.expires_at, lease.term = now + lease.ttl, db.term
                db.execute("UPDATE leases SET expires_at=?, term=? WHERE id=?",
                           (lease.expires_at, db.term, lease_id))
        if expired:
            raise LeaseError(f"lease {lease_id} has expired")
        return lease

    @retried
    def detach(self, lease_id: str, now: float) -> LeaseRecord:
        with self._tx() as db:
            lease = self._known_lease(db, lease_id)
            if lease.state == "active":
                self._end(db, lease_id, "ended", "detached", now)
            return self._lease(db, lease_id)  # type: ignore[return-value]

    def lease(self, lease_id: str) -> LeaseRecord | None:
        with self._read() as db:
            return self._lease(db, lease_id)

    def leases(self, include_ended: bool = False, owner: str | None = None) -> list[LeaseRecord]:
        """Active leases (`include_ended`: all), of one owner or (None) of everyone."""
        where, args = [], []
        if not include_ended:
            where.append("state='active'")
        if owner is not None:
            where.append("owner=?")
            args.append(owner)
        query = "SELECT id FROM leases" + (" WHERE " + " AND ".join(where) if where else "")
        with self._read() as db:
            ids = [r["id"] for r in db.execute(query + " ORDER BY created_at", args).fetchall()]
            return [self._lease(db, i) for i in ids]  # type: ignore[misc]

    @retried
    def reap(self, now: float, down_after: float) -> dict[str, list[str]]:
        """Mark silent servers down (their leases lost) and overdue leases expired."""
        with self._tx() as db:
            down = [r["name"] for r in db.execute(
                "SELECT name FROM servers WHERE state!='down' AND last_heartbeat < ? "
                "ORDER BY name", (now - down_after,)).fetchall()]
            lost: list[str] = []
            for name in down:
                db.execute("UPDATE servers SET state='down', sessions=0, memory_used=0, term=? "
                           "WHERE name=?", (db.term, name))
                lost += self._lose_leases(db, name, f"server {name} is down", now)
            expired = [r["id"] for r in db.execute(
                "SELECT id FROM leases WHERE state='active' AND expires_at < ? ORDER BY id",
                (now,)).fetchall()]
            for lease_id in expired:
                self._end(db, lease_id, "expired", "not renewed in time", now)
            return {"down": down, "lost": lost, "expired": expired}

    @retried
    def forgive_silence(self, now: float, grace: float = 0.0) -> None:
        """After a scheduler restart (or a failover), count its own downtime against no
        server, and give each `grace` more seconds to find the scheduler again."""
        with self._tx() as db:
            db.execute("UPDATE servers SET last_heartbeat=?, term=? WHERE state!='down'",
                       (now + grace, db.term))

    # -- helpers -------------------------------------------------------------------
    def _lose_leases(self, db: Transaction, server: str, reason: str, now: float) -> list[str]:
        ids = [r["id"] for r in db.execute(
            "SELECT DISTINCT l.id AS id FROM leases l JOIN lease_devices d ON d.lease_id=l.id "
            "WHERE d.server=? AND l.state='active' ORDER BY l.id", (server,)).fetchall()]
        for lease_id in ids:
            self._end(db, lease_id, "lost", reason, now)
        return ids

    @staticmethod
    def _end(db: Transaction, lease_id: str, state: str, reason: str, now: float) -> None:
        db.execute("UPDATE leases SET state=?, reason=?, term=?, expires_at=CASE WHEN "
                   "expires_at < ? THEN expires_at ELSE ? END WHERE id=?",
                   (state, reason, db.term, now, now, lease_id))

    def _known_lease(self, db: Transaction, lease_id: str) -> LeaseRecord:
        lease = self._lease(db, lease_id)
        if lease is None:
            raise LeaseError(f"unknown lease {lease_id}")
        return lease

    @staticmethod
    def _lease(db: Transaction, lease_id: str) -> LeaseRecord | None:
        row = db.execute("SELECT * FROM leases WHERE id=?", (lease_id,)).fetchone()
        if row is None:
            return None
        devices = [{"server": d["server"], "index": d["idx"], "memory": int(d["memory"]),
                    "share": d["share"]}
                   for d in db.execute("SELECT * FROM lease_devices WHERE lease_id=?",
                                       (lease_id,)).fetchall()]
        return LeaseRecord(id=row["id"], state=row["state"], created_at=row["created_at"],
                           expires_at=row["expires_at"], ttl=row["ttl"], memory=int(row["memory"]),
                           share=row["share"], client_name=row["client_name"],
                           reason=row["reason"], devices=devices, owner=row["owner"],
                           term=int(row["term"]))


def _backend_of(facts: str | None) -> str:
    """The backend name in a device's registered facts (its `DeviceInfo`), or ""."""
    try:
        value = json.loads(facts or "{}").get("backend", "")
    except (ValueError, AttributeError):
        return ""
    return value if isinstance(value, str) else ""
