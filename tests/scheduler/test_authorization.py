"""Who may do what, and the failure paths a pool must survive (real harp processes).

A lease belongs to the identity that attached it; other clients cannot see, renew
or detach it; pool-wide operations are an admin's; a pool server registers only
under its certificate's name. Memory quotas hold across every session of a lease,
sessions per lease are capped, and a detached lease's token is refused at once.
"""
from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

import harp
from harp.client.pool import scheduler_channel
from harp.proto import scheduler_pb2 as pb
from harp.proto import scheduler_pb2_grpc as pb_grpc

from .conftest import wait_until

MiB = 1 << 20


def test_a_lease_is_its_owners(cluster):
    cluster.start_server("p1")
    alice, bob = cluster.identity("client", "alice"), cluster.identity("client", "bob")
    with cluster.scheduler_client(alice) as a, cluster.scheduler_client(bob) as b:
        lease = a.attach("cpu", memory=32 * MiB)
        assert lease.owner == "alice"
        assert [x.lease_id for x in a.leases()] == [lease.lease_id]
        assert b.leases() == []                                    # not bob's to see
        with pytest.raises(harp.AuthError, match="client bob may not renew lease .* alice"):
            b.renew(lease.lease_id)
        with pytest.raises(harp.AuthError, match="client bob may not detach"):
            b.detach(lease.lease_id)
        with pytest.raises(harp.AuthError, match="is for admins"):
            b.leases(everyone=True)
        with pytest.raises(harp.AuthError, match="is for admins"):
            b.drain("p1")
        assert a.renew(lease.lease_id).state == "active"            # still alice's, alive
    admin = cluster.identity("admin", "ops")
    with cluster.scheduler_client(admin) as ops:
        assert [x.owner for x in ops.leases(everyone=True)] == ["alice"]
        assert ops.drain("p1")["state"] == "draining"
        assert ops.detach(lease.lease_id).state == "ended"          # an admin may


def test_another_identitys_token_cannot_take_the_lease_away(cluster):
    """Bob cannot renew alice's lease to get a token for it (the old attack)."""
    cluster.start_server("p1")
    alice, bob = cluster.identity("client", "alice"), cluster.identity("client", "bob")
    with cluster.scheduler_client(alice) as a:
        lease = a.attach("cpu", memory=32 * MiB)
    with cluster.scheduler_client(bob) as b, pytest.raises(harp.AuthError):
        b.renew(lease.lease_id)


def test_a_server_registers_only_under_its_own_name(cluster):
    cluster.start_server("p1")
    impostor = cluster.identity("server", "p2")                     # a real server cert
    with scheduler_channel(cluster.url, tls=impostor) as channel:
        stub = pb_grpc.SchedulerStub(channel)
        for call, request in ((stub.Register, pb.RegisterRequest(name="p1", instance="evil")),
                              (stub.Heartbeat, pb.HeartbeatRequest(name="p1", instance="x")),
                              (stub.Watch, pb.WatchRequest(name="p1", instance="x"))):
            with pytest.raises(grpc.RpcError) as info:
                result = call(request, timeout=10)
                if call is stub.Watch:
                    next(iter(result))
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "may register only as 'p2'" in info.value.details()
    assert cluster.cli("pool", "ls")[0]["state"] == "up"


def test_a_server_with_another_name_than_its_certificate_does_not_start(cluster):
    cluster.identity("server", "p1")
    out = cluster.cli("server", "serve", "--listen", "127.0.0.1:0", "--name", "other",
                      "--scheduler", cluster.url, "--cert-dir", str(cluster.certs),
                      "--cert-name", "p1", check=False, json_out=False)
    assert out.returncode == 1 and "registers under the name its certificate carries" in out.stderr


def test_memory_is_a_leases_across_its_sessions_and_sessions_are_capped(cluster):
    cluster.start_server("p1", "256MiB", 1, "--max-sessions-per-lease", "3")
    with cluster.scheduler_client() as s:
        lease = s.attach("cpu", memory=64 * MiB)
    first = harp.connect(lease, tls=cluster.client_tls, renew=False)
    second = harp.connect(lease, tls=cluster.client_tls, renew=False)
    third = harp.connect(lease, tls=cluster.client_tls, renew=False)
    try:
        first.alloc(48 * MiB)
        first.synchronize()
        assert second.mem_info().free == 16 * MiB                   # the lease's, shared
        second.alloc(32 * MiB)
        with pytest.raises(harp.QuotaError, match="lease's memory quota"):
            second.synchronize()
        with pytest.raises(harp.QuotaError, match="already has 3 sessions"):
            harp.connect(lease, tls=cluster.client_tls, renew=False)
    finally:
        for dev in (first, second, third):
            dev.close()


def test_a_detached_lease_ends_its_sessions_and_its_token_is_refused_at_once(cluster):
    cluster.start_server("p1")
    with cluster.scheduler_client() as s:
        lease = s.attach("cpu", memory=32 * MiB)
    dev = harp.connect(lease, tls=cluster.client_tls, renew=False)
    dev.synchronize()
    with cluster.scheduler_client() as s:
        s.detach(lease.lease_id)
    t0 = time.monotonic()
    # the server hears of it on its revocation stream: a new session is refused ...
    assert wait_until(lambda: _refused(lease, cluster), 5, 0.05)
    refused_after = time.monotonic() - t0
    # ... and the open one ends with the lease's own error
    with pytest.raises(harp.LeaseError):
        for _ in range(50):
            dev.synchronize()
            time.sleep(0.05)
    ended_after = time.monotonic() - t0
    dev.close()
    print(f"token refused {refused_after:.2f} s, session ended {ended_after:.2f} s after detach")
    assert refused_after < 1.0 and ended_after < 2.5


def _refused(lease, cluster):
    try:
        harp.connect(lease, tls=cluster.client_tls, renew=False).close()
    except harp.LeaseError:
        return True
    return False


def test_tokens_are_short_lived_and_the_keeper_renews_them(tmp_path):
    """A server that never hears of an end still refuses a token soon: tokens live for
    --token-ttl; a renewing client always has a fresh one."""
    from .conftest import Cluster
    c = Cluster(tmp_path)
    c.start_scheduler(token_ttl=2)
    try:
        c.start_server("p1")
        with c.scheduler_client() as s:
            lease = s.attach("cpu", memory=32 * MiB, ttl_s=60)
        assert lease.token_ttl_s == 2
        time.sleep(2.5)
        with pytest.raises(harp.LeaseError, match="expired"):
            harp.connect(lease, tls=c.client_tls, renew=False)     # a stale token
        with harp.connect(lease, tls=c.client_tls) as dev:          # renewed at connect
            dev.synchronize()
            time.sleep(2.5)
            assert dev.lease_keeper.renewals >= 2                    # every ttl/3
            with harp.connect(dev.lease_keeper.lease, tls=c.client_tls, renew=False) as again:
                again.synchronize()
    finally:
        c.stop()


def test_a_lease_that_expires_during_a_sync_call_frees_its_slot(cluster):
    """The session ends with a LeaseError even while a long call runs, and its slot is
    free at once (a server of one session admits the next)."""
    cluster.start_server("p1", "256MiB", 1, "--max-sessions", "1")
    with cluster.scheduler_client() as s:
        lease = s.attach("cpu", memory=128 * MiB, ttl_s=2)
    dev = harp.connect(lease, tls=cluster.client_tls, renew=False)
    lib = dev.load_module(harp.CATALOG_IMAGE, "catalog")
    gemm = dev.function(lib, "gemm_f64")
    m = 1024
    buf = dev.alloc(m * m * 8)
    for _ in range(400):                                             # ~20 s of work
        dev.launch(gemm, 1, 1, [buf, buf, buf, np.int64(m), np.int64(m), np.int64(m),
                                np.float64(1), np.float64(0)])
    t0 = time.monotonic()
    with pytest.raises(harp.LeaseError):
        dev.synchronize()
    assert time.monotonic() - t0 < 10
    dev.close()
    with cluster.scheduler_client() as s:
        other = s.attach("cpu", memory=64 * MiB)
    with harp.connect(other, tls=cluster.client_tls) as next_one:    # the slot is free
        next_one.synchronize()


def test_max_sessions_holds_under_concurrent_connects(cluster):
    cluster.start_server("p1", "256MiB", 1, "--max-sessions", "4")
    with cluster.scheduler_client() as s:
        leases = [s.attach("cpu", memory=16 * MiB, share=0.05) for _ in range(12)]
    opened, refused, other = [], [], []
    gate = threading.Barrier(12)

    def one(lease):
        gate.wait()
        try:
            opened.append(harp.connect(lease, tls=cluster.client_tls, renew=False))
        except harp.NoCapacityError as exc:
            refused.append(exc)
        except Exception as exc:
            other.append(exc)
    threads = [threading.Thread(target=one, args=(x,)) for x in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for dev in opened:
        dev.close()
    assert not other, other
    assert len(opened) == 4 and len(refused) == 8
    assert "maximum of 4 sessions" in str(refused[0])


def test_an_idle_session_is_ended_and_its_slot_freed(cluster):
    cluster.start_server("p1", "256MiB", 1, "--idle-timeout", "1", "--max-sessions", "1")
    with cluster.scheduler_client() as s:
        lease = s.attach("cpu", memory=16 * MiB)
    dev = harp.connect(lease, tls=cluster.client_tls)
    dev.synchronize()
    time.sleep(2.0)
    with pytest.raises(harp.QuotaError, match="idle for more than 1 s"):
        dev.synchronize()
    dev.close()
    with harp.connect(lease, tls=cluster.client_tls) as again:
        again.synchronize()
