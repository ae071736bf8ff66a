"""Leadership and fencing on a real PostgreSQL server, in one process: two replicas'
stores and leaderships on one database, driven step by step."""
from __future__ import annotations

import secrets
import threading

import psycopg
import pytest

import harp
from harp.scheduler.leadership import Leadership
from harp.scheduler.placement import Request

from .conftest import wait_until

GiB = 1 << 30


@pytest.fixture
def replicas(postgres):
    """Two replicas' (store, leadership) pairs on a fresh database, and an admin DSN."""
    from harp.scheduler.postgres import PostgresStore
    dsn = postgres.database(f"lead_{secrets.token_hex(4)}")
    made = []
    for name in ("a", "b"):
        leadership = Leadership(dsn, name=name, timeout_s=30)
        leadership.address = f"harp://{name}:50050"
        made.append((PostgresStore(dsn), leadership))
    yield dsn, made
    for store, leadership in made:
        leadership.step_down("test over")
        store.close()


def _lock_backend(dsn: str, name: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                           (f"harp-scheduler-lock {name}",)).fetchone()
    return row[0]


def _register(store, name="s1"):
    store.register(name, "i1", "h1", [f"harp://{name}"],
                   [(0, "cpu", GiB, {"kind": "cpu", "name": "x", "backend": "cpu", "index": 0,
                                     "memory": GiB})], 0.0)


def test_one_leader_at_a_time_and_a_deposed_leader_cannot_commit(replicas):
    dsn, [(store_a, lead_a), (store_b, lead_b)] = replicas
    deposed = []
    lead_a.on_deposed = deposed.append
    store_a.term = lead_a.try_lead()
    assert store_a.term == 1 and lead_a.term == 1
    assert lead_b.try_lead() is None                        # the lock is taken
    with pytest.raises(harp.NotLeaderError, match="leader is harp://a:50050"):
        _register(store_b)                                  # a follower writes nothing
    _register(store_a)
    lease = store_a.attach(Request("cpu", 1, GiB // 4, 0.25, False, "h1", "spread"), 60, "t", 1.0)
    assert lease.term == 1

    # A loses its lock connection (as when the database ends it) but has not noticed yet.
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (_lock_backend(dsn, "a"),))
    store_b.term = wait_until(lead_b.try_lead, 10)
    assert store_b.term == 2
    assert store_a.term == 1                                # A still believes it leads
    request = Request("cpu", 1, GiB // 4, 0.25, False, "h1", "spread")
    for change in (lambda: store_a.attach(request, 60, "t", 2.0),
                   lambda: store_a.renew(lease.id, 2.0),
                   lambda: store_a.detach(lease.id, 2.0),
                   lambda: store_a.reap(1e12, 1.0),
                   lambda: _register(store_a)):
        with pytest.raises(harp.NotLeaderError, match="term 1 has ended: term 2 leads at "
                                                      "harp://b:50050"):
            change()
    assert [x.id for x in store_b.leases()] == [lease.id]   # nothing A tried was committed
    assert store_b.lease(lease.id).state == "active"
    assert not lead_a.ping() and deposed == [1]             # A steps down at its next ping
    assert lead_a.term is None
    assert store_b.renew(lease.id, 3.0).term == 2           # the new term is written


def test_a_change_in_flight_commits_before_the_next_term_begins(replicas):
    dsn, [(store_a, lead_a), (store_b, lead_b)] = replicas
    store_a.term = lead_a.try_lead()
    _register(store_a)
    in_flight = store_a._tx()
    db = in_flight.__enter__()                              # A's change holds the term row
    db.execute("UPDATE servers SET sessions=7 WHERE name='s1'")
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (_lock_backend(dsn, "a"),))
    took = []
    taker = threading.Thread(target=lambda: took.append(wait_until(lead_b.try_lead, 10)))
    taker.start()
    taker.join(1.0)
    assert taker.is_alive()                                 # B's new term waits for A's change
    in_flight.__exit__(None, None, None)                    # which commits, under term 1
    taker.join(10)
    assert took == [2]
    assert store_b.servers()[0]["sessions"] == 7


def test_a_frozen_leader_loses_the_lock_after_the_timeout(postgres):
    from harp.scheduler.postgres import PostgresStore
    dsn = postgres.database(f"frozen_{secrets.token_hex(4)}")
    store = PostgresStore(dsn)
    frozen = Leadership(dsn, name="frozen", timeout_s=1.0)
    other = Leadership(dsn, name="other", timeout_s=1.0)
    try:
        assert frozen.try_lead() == 1                       # then never pings again
        assert other.try_lead() is None
        assert wait_until(other.try_lead, 10) == 2          # the database ended its session
        assert frozen.term is None                          # and it knows its ping is stale
        assert store.leader()["leader"] == "other"
    finally:
        for leadership in (frozen, other):
            leadership.step_down("test over")
        store.close()


def test_replicas_must_share_one_signing_key(postgres):
    from harp.scheduler.postgres import PostgresStore
    store = PostgresStore(postgres.database(f"key_{secrets.token_hex(4)}"))
    try:
        store.claim_signing_key("aaaa")
        store.claim_signing_key("aaaa")                     # the same key again: fine
        with pytest.raises(harp.LeaseError, match="same key file"):
            store.claim_signing_key("bbbb")
    finally:
        store.close()
