"""`PostgresStore`: the scheduler's state in PostgreSQL, shared by scheduler replicas.

Same operations and semantics as `SqliteStore` (the SQL is shared), plus:

- Fencing. Every change begins by reading the leadership row `FOR SHARE` and
  checking that its term is still this replica's (`term`, set by `Leadership`);
  otherwise it raises `NotLeaderError` and changes nothing. A new leader bumps the
  term with an UPDATE of that row, which waits for every change holding the share
  lock to end, so each change commits wholly before or wholly after a failover,
  and a deposed leader that still runs can no longer commit. The term is written
  into every row a change touches.
- Placement under concurrency: row locks, not SERIALIZABLE. An attach takes a
  transaction-scoped advisory lock (`PLACEMENT_LOCK`) before it reads what the
  devices hold, so attaches are placed one after another with fresh reads (READ
  COMMITTED takes a new snapshot per statement), while renewals, heartbeats and
  detaches run beside them. SERIALIZABLE would let 50 simultaneous attaches read
  the same usage, fail all but one at commit and retry the rest: more round trips,
  more work, for the same order. Deadlocks between other changes are retried.
- Connections come from a small pool; each bounds how long it may sit idle inside
  a transaction, so a replica frozen mid-change (SIGSTOP) cannot hold the share
  lock, and with it a failover, for longer than that.
"""
from __future__ import annotations

import queue
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import psycopg
from psycopg import conninfo
from psycopg.rows import dict_row

from harp.errors import ArgumentError, LeaseError, NotLeaderError, TransportError

from .sqlstore import SqlStore, Transaction

#: Advisory lock keys (64-bit): "harplace" serializes placements, "harpsche" schema set-up.
PLACEMENT_LOCK = 0x686172706C616365
SCHEMA_LOCK = 0x6861727073636865

SCHEMA = """
CREATE TABLE IF NOT EXISTS servers (
    name TEXT PRIMARY KEY,
    instance TEXT NOT NULL,
    host TEXT NOT NULL,
    endpoints TEXT NOT NULL,
    state TEXT NOT NULL,
    last_heartbeat DOUBLE PRECISION NOT NULL,
    sessions BIGINT NOT NULL DEFAULT 0,
    memory_used BIGINT NOT NULL DEFAULT 0,
    session_stats TEXT NOT NULL DEFAULT '[]',
    term BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS devices (
    server TEXT NOT NULL REFERENCES servers(name),
    idx INTEGER NOT NULL,
    kind TEXT NOT NULL,
    facts TEXT NOT NULL,
    memory BIGINT NOT NULL,
    PRIMARY KEY (server, idx)
);
CREATE TABLE IF NOT EXISTS leases (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    ttl DOUBLE PRECISION NOT NULL,
    memory BIGINT NOT NULL,
    share DOUBLE PRECISION NOT NULL,
    client_name TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    owner TEXT NOT NULL DEFAULT '',
    term BIGINT NOT NULL DEFAULT 0,
    request_id TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS lease_devices (
    lease_id TEXT NOT NULL REFERENCES leases(id),
    server TEXT NOT NULL,
    idx INTEGER NOT NULL,
    memory BIGINT NOT NULL,
    share DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS lease_devices_by_device ON lease_devices (server, idx);
CREATE INDEX IF NOT EXISTS lease_devices_by_lease ON lease_devices (lease_id);
CREATE INDEX IF NOT EXISTS leases_by_request ON leases (owner, request_id);
CREATE INDEX IF NOT EXISTS leases_by_state ON leases (state);
CREATE TABLE IF NOT EXISTS leadership (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    term BIGINT NOT NULL,                  -- bumped by each new leader
    leader TEXT NOT NULL,                  -- its replica name
    address TEXT NOT NULL,                 -- where clients reach it
    started_at DOUBLE PRECISION NOT NULL   -- unix seconds, the database's clock
);
INSERT INTO leadership (id, term, leader, address, started_at) VALUES (1, 0, '', '', 0)
    ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS scheduler_settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


def check_dsn(dsn: str) -> str:
    """`dsn` if libpq can read it (a postgresql:// URL or `host=... dbname=...`), else an
    `ArgumentError` saying why."""
    try:
        conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise ArgumentError(f"not a PostgreSQL connection string: {exc}") from None
    return dsn


def describe_dsn(dsn: str) -> str:
    """The DSN for logs: host, port and database, never the password."""
    try:
        parts = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "postgresql (unreadable DSN)"
    host = parts.get("host") or "localhost"
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{host}{port}/{parts.get('dbname') or parts.get('user') or ''}"


class ConnectionPool:
    """At most `size` open connections to one database, handed out one at a time; a
    connection that broke is dropped, not handed out again."""

    def __init__(self, dsn: str, size: int, settings: dict[str, str]) -> None:
        self._dsn = dsn
        self._settings = settings
        self._idle: queue.LifoQueue = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(size)
        self._open: set[psycopg.Connection] = set()
        self._lock = threading.Lock()

    def _connect(self) -> psycopg.Connection:
        conn = psycopg.connect(self._dsn, autocommit=True, row_factory=dict_row,
                               connect_timeout=10)
        for name, value in self._settings.items():
            conn.execute("SELECT set_config(%s, %s, false)", (name, value))
        with self._lock:
            self._open.add(conn)
        return conn

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        """A connection for the duration of the block (waits while all are in use)."""
        self._slots.acquire()
        conn = None
        try:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = self._connect()
            yield conn
        finally:
            if conn is not None:
                if conn.closed or conn.broken:
                    self._forget(conn)
                else:
                    self._idle.put(conn)
            self._slots.release()

    def _forget(self, conn: psycopg.Connection) -> None:
        with self._lock:
            self._open.discard(conn)
        conn.close()

    def close(self) -> None:
        """Close every connection the pool opened."""
        with self._lock:
            conns, self._open = list(self._open), set()
        for conn in conns:
            conn.close()


class PostgresStore(SqlStore):
    """The scheduler's state in a PostgreSQL database that replicas share.

    `term` is None until `Leadership` makes this replica the leader; until then, and
    after it steps down, every change is refused with `NotLeaderError` (reads work)."""

    RETRYABLE = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)

    def __init__(self, dsn: str, *, pool_size: int = 8, stuck_transaction_s: float = 5.0
                 ) -> None:
        self.dsn = check_dsn(dsn)
        self.term: int | None = None
        self._pool = ConnectionPool(self.dsn, pool_size, {
            "idle_in_transaction_session_timeout": f"{int(stuck_transaction_s * 1000)}",
            "application_name": "harp-scheduler"})
        with self._connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            conn.execute(SCHEMA)

    @property
    def location(self) -> str:
        return describe_dsn(self.dsn)

    def close(self) -> None:
        self._pool.close()

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        """A pooled connection; a database that cannot be reached is a `TransportError`."""
        try:
            with self._pool.connection() as conn:
                yield conn
        except psycopg.OperationalError as exc:
            raise TransportError(f"the scheduler's database ({self.location}) failed: "
                                 f"{' '.join(str(exc).split())}") from None

    @contextmanager
    def _tx(self) -> Iterator[Transaction]:
        term = self.term
        if term is None:
            raise NotLeaderError(self.not_leader_message())
        with self._connection() as conn, conn.transaction():
            row = conn.execute("SELECT term, address FROM leadership WHERE id=1 FOR SHARE"
                               ).fetchone()
            if row["term"] != term:
                raise NotLeaderError(f"this scheduler replica's term {term} has ended: term "
                                     f"{row['term']} leads at {row['address'] or '(unknown)'}")
            yield Transaction(conn, term, "%s")

    @contextmanager
    def _read(self) -> Iterator[Transaction]:
        with self._connection() as conn, conn.transaction():
            yield Transaction(conn, self.term or 0, "%s")

    def _lock_placement(self, db: Transaction) -> None:
        db.execute("SELECT pg_advisory_xact_lock(?)", (PLACEMENT_LOCK,))

    # -- replicas ---------------------------------------------------------------------
    def leader(self) -> dict[str, Any]:
        """The leadership row: term, leader (replica name), address, started_at."""
        with self._read() as db:
            return dict(db.execute("SELECT term, leader, address, started_at FROM leadership "
                                   "WHERE id=1").fetchone())

    def not_leader_message(self) -> str:
        try:
            row = self.leader()
        except TransportError:
            return "this scheduler replica does not lead, and the database is unreachable"
        if not row["address"]:
            return "this scheduler replica does not lead; no replica has led yet"
        return (f"this scheduler replica does not lead; the leader is {row['address']} "
                f"(term {row['term']})")

    def claim_signing_key(self, key_id: str) -> None:
        """Record the pool's signing key (its fingerprint) on first start, and refuse a
        replica whose key differs: pool servers pin one key, so every replica must sign
        with it."""
        with self._connection() as conn, conn.transaction():
            conn.execute("INSERT INTO scheduler_settings (name, value) VALUES "
                         "('signing_key_id', %s) ON CONFLICT (name) DO NOTHING", (key_id,))
            pinned = conn.execute("SELECT value FROM scheduler_settings WHERE "
                                  "name='signing_key_id'").fetchone()["value"]
        if pinned != key_id:
            raise LeaseError(f"this scheduler's signing key ({key_id}) is not the key the "
                             f"pool's replicas sign with ({pinned}): give every replica the "
                             "same key file (--signing-key)")
