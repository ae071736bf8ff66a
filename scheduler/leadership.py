"""One leader at a time among scheduler replicas that share a PostgreSQL database.

Each replica keeps one dedicated connection and tries, every `timeout_s / 4`, to
take a session-level advisory lock (`LEADER_LOCK`) on it. The replica that gets
it bumps the term in the `leadership` row (with its name and the address clients
reach it at) and leads under that term until its lock connection is lost:

- A leader that dies (SIGKILL, a crash, a lost host) closes the connection, so the
  lock is free at once and a follower takes it at its next try.
- A leader that freezes (SIGSTOP, a stalled VM) stops pinging; the connection is
  made with `idle_session_timeout = timeout_s`, so the database ends it, and with
  it the lock, `timeout_s` after the last ping.
- A leader whose ping fails, or that finds its last good ping older than
  `timeout_s` (it was frozen), steps down at once: it closes the connection and
  tells the service, which refuses changes from then on.

Stepping down is a courtesy, not the safety net: the store checks the term in the
same transaction as every change (fencing, `postgres.PostgresStore`), so a
deposed leader that has not noticed yet still cannot commit.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import psycopg

log = logging.getLogger("harp.scheduler")

#: The leader's advisory lock key (64-bit): "harplead".
LEADER_LOCK = 0x686172706C656164


class Leadership:
    """Campaigns for leadership and keeps it; calls `on_elected(term)` when this replica
    starts to lead and `on_deposed(term)` when it stops."""

    def __init__(self, dsn: str, *, name: str, timeout_s: float = 5.0,
                 on_elected: Callable[[int], None] = lambda term: None,
                 on_deposed: Callable[[int], None] = lambda term: None) -> None:
        self.dsn = dsn
        self.name = name
        self.address = ""
        self.timeout_s = timeout_s
        self.interval_s = timeout_s / 4
        self.on_elected = on_elected
        self.on_deposed = on_deposed
        self._term: int | None = None
        self.started_at = 0.0             # when the current term began (database clock)
        self._last_ping = 0.0             # monotonic time the last good ping was sent
        self._conn: psycopg.Connection | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="harp-leadership", daemon=True)

    @property
    def term(self) -> int | None:
        """This replica's term while it leads (and its last ping is fresh), else None."""
        with self._lock:
            if self._term is None or time.monotonic() - self._last_ping >= self.timeout_s:
                return None
            return self._term

    def start(self, address: str) -> None:
        """Campaign in the background, advertising `address` to clients while leading."""
        self.address = address
        self._thread.start()

    def stop(self) -> None:
        """Stop campaigning, and give up the lead (closing the lock connection frees the
        lock at once, so a follower takes over without waiting for a timeout)."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(self.timeout_s + 5)
        self.step_down("stopping")

    # -- one round -----------------------------------------------------------------------
    def try_lead(self) -> int | None:
        """One attempt to take the lock; on success, the new term (and `on_elected` ran)."""
        conn = self._connection()
        sent = time.monotonic()
        got = conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,)).fetchone()[0]
        if not got:
            return None
        with conn.transaction():
            term, started_at = conn.execute(
                "UPDATE leadership SET term = term + 1, leader = %s, address = %s, "
                "started_at = extract(epoch FROM clock_timestamp()) WHERE id = 1 "
                "RETURNING term, started_at", (self.name, self.address)).fetchone()
        self.started_at = float(started_at)
        # The service gets ready to write (and forgives the servers the failover) before
        # `term` says that this replica leads, so no request meets a half-made leader.
        try:
            self.on_elected(term)
        except Exception:
            log.exception("taking over as leader failed; stepping down")
            self.on_deposed(term)
            self.step_down("taking over failed")
            return None
        with self._lock:
            self._term, self._last_ping = term, sent
        log.info("leading the scheduler replicas as %s (term %d)", self.address, term)
        return term

    def ping(self) -> bool:
        """Keep the lock connection alive; False (and stepped down) if it is lost."""
        with self._lock:
            conn, stale = self._conn, time.monotonic() - self._last_ping >= self.timeout_s
        if stale:                          # frozen past the timeout: the lock may be gone
            self.step_down(f"no ping for over {self.timeout_s:g} s")
            return False
        sent = time.monotonic()
        try:
            assert conn is not None
            conn.execute("SELECT 1")
        except (psycopg.Error, AssertionError) as exc:
            self.step_down(f"lost the lock connection ({str(exc).strip() or 'closed'})")
            return False
        with self._lock:
            self._last_ping = sent
        return True

    def step_down(self, why: str) -> None:
        """Stop leading now: close the lock connection (freeing the lock) and say so."""
        with self._lock:
            term, self._term = self._term, None
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        if term is not None:
            log.warning("stepped down from term %d: %s", term, why)
            self.on_deposed(term)

    # -- the campaign ----------------------------------------------------------------------
    def _connection(self) -> psycopg.Connection:
        with self._lock:
            conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10,
                               application_name=f"harp-scheduler-lock {self.name}")
        ms = str(int(self.timeout_s * 1000))
        conn.execute("SELECT set_config('idle_session_timeout', %s, false), "
                     "set_config('idle_in_transaction_session_timeout', %s, false)", (ms, ms))
        with self._lock:
            self._conn = conn
        return conn

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self._term is None:
                    self.try_lead()
                else:
                    self.ping()
            except psycopg.Error as exc:
                log.info("leadership: database unreachable (%s); trying again",
                         str(exc).strip())
                self.step_down("database unreachable")
                with self._lock:
                    conn, self._conn = self._conn, None
                if conn is not None:
                    conn.close()
            self._stop.wait(self.interval_s)
