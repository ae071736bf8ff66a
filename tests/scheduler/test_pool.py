"""The scheduler with real pool server processes on loopback."""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

import harp
from harp import tokens
from harp.client import connect_lease, connect_remote

from .conftest import wait_until

MiB = 1 << 20


def _round_trip(dev, n=1 << 16):
    buf = dev.alloc(n)
    data = np.arange(n, dtype=np.uint8)
    dev.write(buf, 0, data)
    assert np.array_equal(np.frombuffer(dev.read(buf, 0, n), np.uint8), data)
    dev.free(buf)


def test_attach_places_by_policy_and_capacity_holds_under_50_concurrent_attaches(cluster):
    for name in ("p1", "p2", "p3"):
        cluster.start_server(name, memory="256MiB")
    with cluster.scheduler_client() as s:
        spread = [s.attach("cpu", memory=16 * MiB, share=0.25) for _ in range(3)]
        assert {x.devices[0].server for x in spread} == {"p1", "p2", "p3"}
        for x in spread:
            s.detach(x.lease_id)
        packed = [s.attach("cpu", memory=16 * MiB, share=0.25, policy="pack") for _ in range(2)]
        assert packed[0].devices[0].server == packed[1].devices[0].server
        for x in packed:
            s.detach(x.lease_id)
        local = s.attach("cpu", same_host=True)
        s.detach(local.lease_id)
    results, errors = [], []

    def attach():
        with cluster.scheduler_client() as s:
            try:
                results.append(s.attach("cpu", memory=64 * MiB, share=0.25))
            except harp.NoCapacityError as exc:
                errors.append(exc)
    threads = [threading.Thread(target=attach) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 12 and len(errors) == 38        # 3 servers x 4 quarter shares
    used = {}
    for lease in results:
        d = lease.devices[0]
        used[d.server] = used.get(d.server, 0) + lease.memory
    assert all(v <= 256 * MiB for v in used.values())
    assert "no capacity" in str(errors[0])


def test_quota_from_the_token_is_enforced_and_reported(cluster):
    cluster.start_server("p1", memory="256MiB")
    with cluster.scheduler_client() as s:
        lease = s.attach("cpu", memory=32 * MiB, share=0.5)
    with connect_lease(lease, tls=cluster.client_tls) as dev:
        assert dev.mem_info().total == 32 * MiB
        assert dev.info.memory == 32 * MiB
        ok = dev.alloc(16 * MiB)
        dev.synchronize()
        assert dev.mem_info().free == 16 * MiB
        dev.alloc(17 * MiB)
        with pytest.raises(harp.QuotaError, match="quota"):
            dev.synchronize()
        dev.free(ok)
        _round_trip(dev)                                    # still usable


def test_a_client_that_stops_renewing_loses_its_lease_and_its_memory(cluster):
    cluster.start_server("p1", memory="256MiB")
    with cluster.scheduler_client() as s:
        lease = s.attach("cpu", memory=64 * MiB, ttl_s=2.0)
    dev = connect_lease(lease, tls=cluster.client_tls, renew=False)
    dev.alloc(48 * MiB)
    dev.synchronize()
    pool = lambda: cluster.cli("pool", "ls")[0]  # noqa: E731
    assert wait_until(lambda: pool()["memory_used"] == 48 * MiB, 5)
    t0 = time.monotonic()
    assert wait_until(lambda: pool()["memory_used"] == 0 and pool()["sessions"] == 0, 10)
    assert time.monotonic() - t0 < 2.0 + 2 * cluster.heartbeat + 2.0   # expiry + heartbeat + slack
    with pytest.raises((harp.LeaseError, harp.TransportError)):
        dev.mem_info()
    dev.close()
    with cluster.scheduler_client() as s:
        assert s.leases(include_ended=True)[0].state == "expired"


def test_a_renewing_client_keeps_its_lease_past_the_ttl(cluster):
    cluster.start_server("p1")
    with cluster.scheduler_client() as s:
        lease = s.attach("cpu", ttl_s=1.5)
    with connect_lease(lease, tls=cluster.client_tls) as dev:
        time.sleep(3.5)
        _round_trip(dev)
        assert dev.lease_keeper.renewals >= 2


def test_scheduler_restart_keeps_leases_and_sessions(cluster):
    cluster.start_server("p1")
    with cluster.scheduler_client() as s:
        lease = s.attach("cpu", ttl_s=30)
    dev = connect_lease(lease, tls=cluster.client_tls)
    try:
        keeper = dev.lease_keeper
        keeper.interval_s = 0.5
        cluster.kill(cluster.scheduler)
        for _ in range(3):                                  # sessions run while it is away
            _round_trip(dev)
            time.sleep(0.5)
        before = keeper.renewals
        cluster.start_scheduler()                           # same port, same database
        with cluster.scheduler_client() as s:
            assert [x.lease_id for x in s.leases()] == [lease.lease_id]
        assert wait_until(lambda: keeper.renewals > before, 10)   # renewals resume
        assert keeper.failure is None
        _round_trip(dev)
        # a new session still opens with a token from the restarted scheduler
        with connect_lease(dev.lease_keeper.lease, tls=cluster.client_tls) as other:
            _round_trip(other)
    finally:
        dev.close()


def _token_for(lease, **changes):
    claims = tokens.Claims(lease_id=lease.lease_id, server=lease.devices[0].server,
                           device=lease.devices[0].index, memory=0, share=1.0,
                           expires_at=time.time() + 60, issued_at=time.time(), key_id="")
    return claims.__class__(**{**claims.__dict__, **changes})


def test_forged_expired_foreign_and_misdirected_tokens_are_refused(cluster):
    cluster.start_server("p1")
    with cluster.scheduler_client() as s:
        lease = s.attach("cpu")
    endpoint = lease.devices[0].endpoints[0]
    good = lease.devices[0].token

    def open_with(token, device_index=0):
        return connect_remote(endpoint, tls=cluster.client_tls, token=token,
                              device_index=device_index)
    with open_with(good) as dev:                            # the real token works
        _round_trip(dev)
    head, body, sig = good.split(".")
    claims = json.loads(tokens._unb64(body))
    claims["memory"] = 0                                    # try to lift the quota
    forged_body = tokens._b64(json.dumps(claims, sort_keys=True).encode())
    assert forged_body != body
    with pytest.raises(harp.LeaseError, match="signature"):
        open_with(f"{head}.{forged_body}.{sig}")            # claims changed after signing
    with pytest.raises(harp.LeaseError):
        open_with("")                                       # no token at all
    other = tokens.SigningKey.generate()
    with pytest.raises(harp.LeaseError, match="signature"):
        open_with(other.sign(_token_for(lease, key_id=other.key_id)))  # another scheduler
    key = tokens.SigningKey.load_or_create(cluster.data / "scheduler-signing.key")
    with pytest.raises(harp.LeaseError, match="expired"):
        open_with(key.sign(_token_for(lease, key_id=key.key_id, expires_at=time.time() - 1)))
    with pytest.raises(harp.LeaseError, match="not device 0 on 'p1'"):
        open_with(key.sign(_token_for(lease, key_id=key.key_id, server="p2")))
    with pytest.raises((harp.LeaseError, harp.BackendError)):
        open_with(good, device_index=1)                      # token for device 0 only


def test_a_dead_server_is_marked_down_and_new_attaches_go_elsewhere(cluster):
    cluster.start_server("p1")
    cluster.start_server("p2")
    with cluster.scheduler_client() as s:
        lease = s.attach("cpu")
    victim = lease.devices[0].server
    dev = connect_lease(lease, tls=cluster.client_tls)
    _round_trip(dev)
    cluster.kill(cluster.servers[victim])
    with pytest.raises((harp.TransportError, harp.LeaseError)):
        _round_trip(dev)
    assert wait_until(lambda: {s["name"]: s["state"] for s in cluster.cli("pool", "ls")}
                      [victim] == "down", 10)
    with cluster.scheduler_client() as s:
        with pytest.raises(harp.LeaseError, match="lost"):
            s.renew(lease.lease_id)
        again = s.attach("cpu")
        assert again.devices[0].server != victim
    dev.close()


def test_detach_ends_the_session_on_the_server(cluster):
    cluster.start_server("p1")
    with cluster.scheduler_client() as s:
        lease = s.attach("cpu", memory=32 * MiB)
    dev = connect_lease(lease, tls=cluster.client_tls, renew=False)
    dev.alloc(8 * MiB)
    dev.synchronize()
    with cluster.scheduler_client() as s:
        s.detach(lease.lease_id)
    assert wait_until(lambda: cluster.cli("pool", "ls")[0]["memory_used"] == 0, 10)
    dev.close()


def test_cli_commands_against_a_live_scheduler(cluster):
    cluster.start_server("p1")
    cluster.start_server("p2")
    pool = cluster.cli("pool", "ls")
    assert sorted(s["name"] for s in pool) == ["p1", "p2"]
    assert all(s["state"] == "up" and s["devices"][0]["kind"] == "cpu" for s in pool)
    drained = cluster.cli("server", "drain", "p1")
    assert drained["state"] == "draining"
    lease = cluster.cli("attach", "--kind", "cpu", "--memory", "64MiB", "--share", "0.5")
    assert lease["devices"][0]["server"] == "p2" and lease["memory"] == 64 * MiB
    assert lease["saved_to"] == cluster.env["HARP_LEASE"]
    leases = cluster.cli("leases")
    assert [x["lease_id"] for x in leases] == [lease["lease_id"]]
    # harp.connect() with no arguments opens the stored lease
    import subprocess
    import sys
    code = ("import harp, numpy as np\nd = harp.connect()\nb = d.alloc(8)\n"
            "d.write(b, 0, b'12345678')\nprint(bytes(d.read(b, 0, 8)).decode(), "
            "d.mem_info().total)\nd.close()")
    out = subprocess.run([sys.executable, "-c", code], env=cluster.env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["12345678", str(64 * MiB)]
    ended = cluster.cli("detach")
    assert ended["state"] == "ended"
    assert cluster.cli("leases") == []
    assert cluster.cli("leases", "--ended")[0]["state"] == "ended"
    undrained = cluster.cli("server", "drain", "p1", "--undo")
    assert undrained["state"] == "up"
    refused = cluster.cli("attach", "--kind", "gpu", check=False)
    assert refused.returncode == 1 and "no device of kind 'gpu'" in refused.stderr
    refused = cluster.cli("attach", "--memory", "1GiB", check=False)
    assert refused.returncode == 1 and "no capacity" in refused.stderr
    cluster.kill(cluster.scheduler)
    refused = cluster.cli("pool", "ls", check=False)
    assert refused.returncode == 1 and "unreachable" in refused.stderr


def test_only_pool_servers_may_register_or_heartbeat(cluster):
    """A user's client certificate cannot take over a pool server's name (and its leases)."""
    import grpc
    from harp.client.pool import scheduler_channel
    from harp.proto import scheduler_pb2 as pb
    from harp.proto import scheduler_pb2_grpc as pb_grpc
    cluster.start_server("p1")
    with cluster.scheduler_client() as s:
        lease = s.attach("cpu")
    with scheduler_channel(cluster.url, tls=cluster.client_tls) as channel:
        stub = pb_grpc.SchedulerStub(channel)
        for call, request in ((stub.Register, pb.RegisterRequest(name="p1", instance="evil")),
                              (stub.Heartbeat, pb.HeartbeatRequest(name="p1", instance="x"))):
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "server certificates" in info.value.details()
    with cluster.scheduler_client() as s:
        assert s.renew(lease.lease_id).state == "active"      # the lease was not lost


def test_a_same_host_lease_takes_the_unix_socket_and_shared_memory(cluster):
    import tempfile
    sock = f"{tempfile.mkdtemp(prefix='harp-')}/pool.sock"
    cluster.start_server("p1", "256MiB", 1, "--listen", f"unix:{sock}")
    with cluster.scheduler_client() as s:
        lease = s.attach("cpu", memory=64 * MiB, same_host=True)
    with connect_lease(lease, tls=cluster.client_tls) as dev:
        assert dev.shared_memory                          # picked by itself
        _round_trip(dev, 8 * MiB)
