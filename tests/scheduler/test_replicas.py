"""Two scheduler replicas (`harp scheduler serve --store postgresql://...` processes) on
one real PostgreSQL server, a pool server that knows both, and clients that know both:
placement under concurrency, failover on SIGKILL, fencing of a frozen leader."""
from __future__ import annotations

import json
import secrets
import signal
import threading
import time

import grpc
import psycopg
import pytest

import harp
from harp import tokens
from harp.client import SchedulerClient, connect_lease, connect_remote
from harp.client.pool import scheduler_channel
from harp.proto import scheduler_pb2 as pb
from harp.proto import scheduler_pb2_grpc as pb_grpc
from harp.replicas import LEADER_METADATA

from .conftest import Cluster, wait_until
from .test_pool import _round_trip

MiB = 1 << 20
#: --failover-timeout of the replicas: a frozen leader keeps the lead this long.
FAILOVER_TIMEOUT_S = 3.0


class ReplicaCluster(Cluster):
    """Two scheduler replicas (sharing a data directory, so one signing key) on one
    PostgreSQL database, and the pool servers of `Cluster`."""

    def __init__(self, root, dsn):
        super().__init__(root)
        self.dsn = dsn
        self.replicas: dict[str, list] = {}               # name -> [process, url]

    def start_replica(self, name, port=0):
        proc, line = self._spawn(["scheduler", "serve", "--listen", f"127.0.0.1:{port}",
                                  "--store", self.dsn, "--data-dir", str(self.data),
                                  "--heartbeat", str(self.heartbeat), "--failover-timeout",
                                  str(FAILOVER_TIMEOUT_S), "--cert-dir", str(self.certs)])
        url = line.split("listening on ")[1].split()[0]
        self.replicas[name] = [proc, url]
        self.url = ",".join(u for _, u in self.replicas.values())
        self.env["HARP_SCHEDULER"] = self.url

    def restart(self, name):
        port = int(self.replicas[name][1].rsplit(":", 1)[1])
        self.start_replica(name, port)

    def leader(self):
        """(term, started_at, name of the leading replica) from the database."""
        with psycopg.connect(self.dsn) as conn:
            term, address, started = conn.execute(
                "SELECT term, address, started_at FROM leadership").fetchone()
        name = next((n for n, (_, u) in self.replicas.items() if u == address), None)
        return term, started, name

    def wait_for_leader(self, other_than=None, timeout=15.0):
        def led():
            term, started, name = self.leader()
            alive = name is not None and self.replicas[name][0].poll() is None
            return (term, started, name) if alive and name != other_than else None
        found = wait_until(led, timeout, 0.02)
        assert found, f"no replica leads (database says {self.leader()})"
        return found

    def stub(self, name):
        channel = scheduler_channel(self.replicas[name][1], tls=self.client_tls)
        return channel, pb_grpc.SchedulerStub(channel)

    def stop(self):
        for proc, _ in self.replicas.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            proc.stdout.close()
        super().stop()


@pytest.fixture(scope="module")
def replicas(postgres, tmp_path_factory):
    cluster = ReplicaCluster(tmp_path_factory.mktemp("replicas"),
                             postgres.database(f"replicas_{secrets.token_hex(4)}"))
    try:
        cluster.start_replica("a")
        cluster.start_replica("b")
        cluster.wait_for_leader()
        cluster.start_server("p1", "256MiB", 2)             # told both replicas' addresses
        yield cluster
    finally:
        cluster.stop()


def _claims(token):
    return json.loads(tokens._unb64(token.split(".")[1]))


def test_followers_refuse_changes_and_50_attaches_over_both_never_overcommit(replicas):
    _, _, leader = replicas.wait_for_leader()
    follower = next(n for n in replicas.replicas if n != leader)
    channel, stub = replicas.stub(follower)
    with channel:
        with pytest.raises(grpc.RpcError) as refused:
            stub.Attach(pb.AttachRequest(kind="cpu"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert refused.value.details().startswith("NOT_LEADER: this scheduler replica does "
                                                  "not lead; the leader is ")
        assert (LEADER_METADATA, replicas.replicas[leader][1]) in \
            refused.value.trailing_metadata()
        assert [s.name for s in stub.Pool(pb.PoolRequest(), timeout=10).servers] == ["p1"]

    urls = [replicas.replicas[n][1] for n in (leader, follower)]
    granted, refusals, failures = [], [], []

    def attach(i):                       # half the clients try the follower first
        order = urls if i % 2 else urls[::-1]
        try:
            with SchedulerClient(",".join(order), tls=replicas.client_tls) as s:
                granted.append(s.attach("cpu", memory=64 * MiB, share=0.25))
        except harp.NoCapacityError as exc:
            refusals.append(exc)
        except Exception as exc:          # noqa: BLE001 - reported below
            failures.append(exc)
    threads = [threading.Thread(target=attach, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures
    assert len(granted) == 8 and len(refusals) == 42       # 2 devices x 4 quarter shares
    with psycopg.connect(replicas.dsn) as conn:
        held = conn.execute("SELECT ld.idx, SUM(ld.memory), SUM(ld.share) FROM lease_devices ld "
                            "JOIN leases l ON l.id = ld.lease_id WHERE l.state = 'active' "
                            "GROUP BY ld.idx ORDER BY ld.idx").fetchall()
    assert [(idx, int(mem), float(share)) for idx, mem, share in held] == \
        [(0, 256 * MiB, 1.0), (1, 256 * MiB, 1.0)]
    with replicas.scheduler_client() as s:
        for lease in granted:
            s.detach(lease.lease_id)
        assert s.leases() == []


def test_the_follower_takes_over_from_a_killed_leader_and_leases_go_on(replicas):
    term, _, leader = replicas.wait_for_leader()
    with replicas.scheduler_client() as s:
        lease = s.attach("cpu", memory=32 * MiB, ttl_s=30)
    old_token = lease.devices[0].token
    assert _claims(old_token)["term"] == term
    dev = connect_lease(lease, tls=replicas.client_tls)
    try:
        dev.lease_keeper.interval_s = 0.5
        _round_trip(dev)
        killed = time.monotonic()
        replicas.kill(replicas.replicas[leader][0])
        new_term, started, new_leader = replicas.wait_for_leader(other_than=leader)
        took = time.monotonic() - killed
        print(f"\nfailover after SIGKILL of the leader: {took:.2f} s "
              f"(--failover-timeout {FAILOVER_TIMEOUT_S:g})")
        assert new_term == term + 1
        assert took < FAILOVER_TIMEOUT_S                 # stated bound: timeout/4 + takeover
        _round_trip(dev)                                   # the session never noticed
        endpoint = lease.devices[0].endpoints[0]
        with connect_remote(endpoint, tls=replicas.client_tls, token=old_token) as other:
            _round_trip(other)                             # an old token opens a new session
        before = dev.lease_keeper.renewals
        assert wait_until(lambda: dev.lease_keeper.renewals >= before + 2, 15)
        assert dev.lease_keeper.failure is None            # renewals go to the new leader
        assert dev.lease_keeper.lease.expires_at > lease.expires_at
        time.sleep(4 * replicas.heartbeat)                 # past the down-after time
        dead, alive = replicas.replicas[leader][1], replicas.replicas[new_leader][1]
        replicas.env["HARP_SCHEDULER"] = f"{dead},{alive}"  # the CLI meets the dead one first
        pool = replicas.cli("pool", "ls")
        assert pool[0]["name"] == "p1" and pool[0]["state"] == "up"   # heartbeats moved too
        assert pool[0]["sessions"] == 1
        # a token signed under the old term after the new one began: only a deposed
        # leader could sign it, so the pool server refuses it
        key = tokens.SigningKey.load_or_create(replicas.data / "scheduler-signing.key")
        claims = tokens.Claims(**{**_claims(old_token), "issued_at": started + 10,
                                  "expires_at": time.time() + 60})
        with pytest.raises(harp.LeaseError, match="deposed leader"):
            connect_remote(endpoint, tls=replicas.client_tls, token=key.sign(claims))
        # detaching through the new leader ends the session on the pool server
        with replicas.scheduler_client() as s:
            assert s.detach(lease.lease_id).state == "ended"
            assert wait_until(lambda: s.pool()[0]["sessions"] == 0, 10)
    finally:
        dev.close()
    replicas.restart(leader)                               # back, as a follower
    assert replicas.leader()[2] == new_leader


def test_a_frozen_leader_is_deposed_and_its_late_writes_are_refused(replicas):
    term, _, leader = replicas.wait_for_leader()
    proc = replicas.replicas[leader][0]
    with replicas.scheduler_client() as s:
        lease = s.attach("cpu", memory=16 * MiB, ttl_s=60)
    channel, stub = replicas.stub(leader)
    late = {}

    def renew_at_the_frozen_leader():
        try:
            late["reply"] = stub.Renew(pb.LeaseRef(lease_id=lease.lease_id), timeout=60)
        except grpc.RpcError as exc:
            late["error"] = exc
    proc.send_signal(signal.SIGSTOP)
    try:
        caller = threading.Thread(target=renew_at_the_frozen_leader)
        caller.start()
        frozen = time.monotonic()
        new_term, started, new_leader = replicas.wait_for_leader(other_than=leader, timeout=20)
        took = time.monotonic() - frozen
        print(f"\nfailover after SIGSTOP of the leader: {took:.2f} s "
              f"(--failover-timeout {FAILOVER_TIMEOUT_S:g})")
        assert new_term == term + 1
        assert took < FAILOVER_TIMEOUT_S * 1.25 + 3.0      # timeout + timeout/4, and slack
    finally:
        proc.send_signal(signal.SIGCONT)
    caller.join(60)
    channel.close()
    assert "error" in late, "the deposed leader renewed a lease"
    assert late["error"].details().startswith("NOT_LEADER:")
    with psycopg.connect(replicas.dsn) as conn:
        row = conn.execute("SELECT term, expires_at FROM leases WHERE id = %s",
                           (lease.lease_id,)).fetchone()
    assert row == (term, lease.expires_at)                 # untouched by the old term
    assert replicas.leader()[2] == new_leader              # the thawed one follows
    with replicas.scheduler_client() as s:
        assert s.renew(lease.lease_id).state == "active"
        s.detach(lease.lease_id)
