"""Placement policy and the store's transactions, without processes."""
from __future__ import annotations

import secrets
import threading

import pytest

import harp
from harp.scheduler import SqliteStore
from harp.scheduler.placement import Candidate, Request, choose

GiB = 1 << 30


def cand(server, index=0, kind="cpu", host="h1", memory=4 * GiB, state="up", used_memory=0,
         used_share=0.0, leases=0):
    return Candidate(server, index, kind, host, memory, state, used_memory, used_share, leases)


def req(kind="cpu", count=1, memory=0, share=1.0, same_host=False, host="h1", policy="spread"):
    return Request(kind, count, memory, share, same_host, host, policy)


def test_spread_picks_the_least_loaded_and_pack_the_most():
    pool = [cand("a", leases=2, used_share=0.5, used_memory=GiB),
            cand("b", leases=0), cand("c", leases=1, used_share=0.25, used_memory=GiB)]
    assert choose(pool, req(memory=GiB, share=0.25))[0][0].server == "b"
    assert choose(pool, req(memory=GiB, share=0.25, policy="pack"))[0][0].server == "a"


def test_spread_puts_several_devices_on_distinct_servers():
    pool = [cand("a", 0), cand("a", 1), cand("b", 0)]
    picked = choose(pool, req(count=2))
    assert {c.server for c, _ in picked} == {"a", "b"}


def test_same_host_and_refusals():
    pool = [cand("a", host="h1"), cand("b", host="h2")]
    assert choose(pool, req(same_host=True, host="h2"))[0][0].server == "b"

    def refused(cls, match, candidates, request):
        with pytest.raises(cls, match=match) as caught:
            choose(candidates, request)
        return caught.value.reason                  # the code the scheduler's metrics count
    assert refused(harp.NoCapacityError, "on this host", pool,
                   req(same_host=True, host="h9")) == "not_on_host"
    assert refused(harp.ArgumentError, "no device of kind 'gpu'.*kinds here: cpu", pool,
                   req(kind="gpu")) == "unknown_kind"
    assert refused(harp.NoCapacityError, "down or draining",
                   [cand("a", state="down"), cand("b", state="draining")], req()) \
        == "servers_unavailable"
    assert refused(harp.NoCapacityError, "room", [cand("a", used_share=0.8)],
                   req(share=0.5)) == "no_room"
    assert refused(harp.NoCapacityError, None, [cand("a")], req(memory=8 * GiB)) == "no_room"
    for bad in (req(policy="tight"), req(share=1.5), req(count=0)):
        assert refused(harp.ArgumentError, None, pool, bad) == "bad_request"


def _register(store, name, memory=GiB, devices=1):
    store.register(name, "i1", "h1", [f"harp://{name}"],
                   [(i, "cpu", memory, {"kind": "cpu", "name": "x", "backend": "cpu", "index": i,
                                        "memory": memory}) for i in range(devices)], 0.0)


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request, tmp_path):
    """Opens the store under test (again: the same database), SQLite or PostgreSQL; a
    PostgreSQL store writes as the leader of a fresh database."""
    opened = []
    if request.param == "sqlite":
        def open_():
            opened.append(SqliteStore(tmp_path / "s.sqlite3"))
            return opened[-1]
        yield open_
    else:
        from harp.scheduler.leadership import Leadership
        from harp.scheduler.postgres import PostgresStore
        dsn = request.getfixturevalue("postgres").database(f"store_{secrets.token_hex(4)}")
        leadership = Leadership(dsn, name="test", timeout_s=60)

        def open_():
            opened.append(PostgresStore(dsn))
            opened[-1].term = leadership.term or leadership.try_lead()
            return opened[-1]
        yield open_
        leadership.step_down("test over")
    for store in opened:
        store.close()


def test_concurrent_attaches_never_exceed_capacity(open_store):
    store = open_store()
    for name in ("a", "b", "c"):
        _register(store, name, memory=GiB)
    granted, refused = [], []
    barrier = threading.Barrier(50)

    def attach():
        barrier.wait()
        try:
            granted.append(store.attach(req(memory=GiB // 4, share=0.25), 60, "t", 1.0))
        except harp.NoCapacityError:
            refused.append(1)
    threads = [threading.Thread(target=attach) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 12 and len(refused) == 38       # 3 devices x 4 quarters
    per_device = {}
    for lease in granted:
        d = lease.devices[0]
        per_device[d["server"]] = per_device.get(d["server"], 0) + d["memory"]
    assert all(v <= GiB for v in per_device.values())
    assert len(store.leases()) == 12


def test_leases_survive_reopening_the_database(open_store):
    store = open_store()
    _register(store, "a")
    lease = store.attach(req(), 60, "t", 1.0)
    store.close()
    again = open_store()
    assert again.lease(lease.id).state == "active"
    assert again.renew(lease.id, 2.0).expires_at == 62.0


def test_a_renewal_too_late_ends_the_lease_as_expired(open_store):
    """The refusal is recorded, not rolled back with it: the lease is expired at once, not
    left active until the reaper comes round."""
    store = open_store()
    _register(store, "a")
    lease = store.attach(req(), 60, "t", 0.0)
    with pytest.raises(harp.LeaseError, match="has expired"):
        store.renew(lease.id, 61.0)
    assert store.lease(lease.id).state == "expired"
    with pytest.raises(harp.LeaseError, match="is expired"):
        store.renew(lease.id, 62.0)


def test_reaper_marks_silent_servers_down_and_loses_their_leases(open_store):
    store = open_store()
    _register(store, "a")
    lease = store.attach(req(), 600, "t", 0.0)
    assert store.counts("servers") == {"up": 1} and store.counts("leases") == {"active": 1}
    changed = store.reap(now=100.0, down_after=3.0)
    assert changed["down"] == ["a"] and changed["lost"] == [lease.id]
    assert store.lease(lease.id).state == "lost"
    assert store.counts("servers") == {"down": 1} and store.counts("leases") == {"lost": 1}
    with pytest.raises(harp.LeaseError, match="lost"):
        store.renew(lease.id, 101.0)


def test_kind_matches_the_device_kind_or_its_backend():
    pool = [Candidate("fpga-box", 0, "fpga", "h1", 4 * GiB, "up", 0, 0.0, 0, "opencl"),
            Candidate("npu-box", 0, "npu", "h1", 4 * GiB, "up", 0, 0.0, 0, "onnx"),
            cand("cpu-box")]
    assert choose(pool, req(kind="opencl"))[0][0].server == "fpga-box"
    assert choose(pool, req(kind="fpga"))[0][0].server == "fpga-box"
    assert choose(pool, req(kind="npu"))[0][0].server == "npu-box"
    assert choose(pool, req(kind="onnx"))[0][0].server == "npu-box"
    with pytest.raises(harp.ArgumentError, match="kinds here: cpu, fpga, npu, onnx, opencl"):
        choose(pool, req(kind="gpu"))


def test_the_store_places_by_backend_name(open_store):
    store = open_store()
    _register(store, "cpu-box")
    facts = {"kind": "fpga", "name": "x", "backend": "opencl", "index": 0, "memory": GiB}
    store.register("fpga-box", "i1", "h1", ["harp://x"], [(0, "fpga", GiB, facts)], 0.0)
    lease = store.attach(req(kind="opencl", memory=GiB), ttl=60, client_name="c", now=1.0)
    assert lease.devices[0]["server"] == "fpga-box"
