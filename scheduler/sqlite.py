"""`SqliteStore`: the scheduler's state in one SQLite file, the default.

Every change runs in an IMMEDIATE transaction, so concurrent attaches (threads of
one scheduler, or several schedulers on one file) are serialized and a device is
never handed out beyond its memory and compute share. A single scheduler has no
leadership: it writes term 0.
"""
from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .sqlstore import SqlStore, Transaction

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
    session_stats TEXT NOT NULL DEFAULT '[]',  -- JSON: its open sessions, from the heartbeat
    term INTEGER NOT NULL DEFAULT 0
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
    owner TEXT NOT NULL DEFAULT '',    -- the identity that attached it
    term INTEGER NOT NULL DEFAULT 0,
    request_id TEXT NOT NULL DEFAULT ''  -- the client's id for its attach (retries)
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
    ("servers", "term", "INTEGER NOT NULL DEFAULT 0"),
    ("leases", "term", "INTEGER NOT NULL DEFAULT 0"),
    ("leases", "request_id", "TEXT NOT NULL DEFAULT ''"),
)

#: Indexes on migrated columns, made once the columns exist.
INDEXES = "CREATE INDEX IF NOT EXISTS leases_by_request ON leases (owner, request_id);"


class SqliteStore(SqlStore):
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
            self._db.executescript(INDEXES)

    @property
    def location(self) -> str:
        return self.path

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[Transaction]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield Transaction(self._db, 0)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[Transaction]:
        with self._lock:
            yield Transaction(self._db, 0)
