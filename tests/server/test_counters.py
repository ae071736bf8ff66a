"""A session's counts: the shared block a worker writes and the server reads, and the
pool collector's figures for a session in the server's own process (thread isolation).

- `SharedCounts` read through a second mapping of the same memfd (as the server maps a
  worker's) gives what was published; failures are written only when new, an unknown
  code counts as INTERNAL, and after `close` the last figures stay readable.
- With thread isolation the collector reads the session itself: calls, payload bytes
  and failures by code match what the session did, exactly.
"""
from __future__ import annotations

import os
import types

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import harp
from harp.server.counters import Counts, SharedCounts
from harp.server.metrics import PoolCollector


def _session(**counts):
    base = dict(calls=0, write_bytes=0, read_bytes=0, failed=0, failures={})
    return types.SimpleNamespace(**{**base, **counts})


def test_published_counts_are_read_through_another_mapping():
    worker = SharedCounts.create()
    server = SharedCounts(os.dup(worker.fd))
    try:
        assert server.read() == Counts()
        session = _session(calls=7, write_bytes=4096, read_bytes=100)
        worker.publish(session, device_ns=1_500)
        assert server.read() == Counts(7, 4096, 100, 1_500, {})
        session.failures, session.failed = {"INVALID_HANDLE": 2, "SOMETHING_NEW": 1}, 3
        session.calls = 9
        worker.publish(session, device_ns=2_000)
        assert server.read() == Counts(9, 4096, 100, 2_000,
                                       {"INVALID_HANDLE": 2, "INTERNAL": 1})
        session.failures["INVALID_HANDLE"] = 5       # not new by the sum: not rewritten
        worker.publish(session, device_ns=2_000)
        assert server.read().errors["INVALID_HANDLE"] == 2
    finally:
        worker.close()
    final = server.read()
    server.close()
    assert server.read() == final and final.calls == 9
    assert Counts(1, 2, 3, 4, {"QUOTA": 1}) + Counts(1, 0, 0, 0, {"QUOTA": 2, "AUTH": 1}) \
        == Counts(2, 2, 3, 4, {"QUOTA": 3, "AUTH": 1})


def _session_samples(pool, dev) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(PoolCollector(pool.server))
    families = text_string_to_metric_families(generate_latest(registry).decode())
    return {s.name: s.value for f in families for s in f.samples
            if s.labels.get("session") == dev.session_id}


def test_thread_isolation_sessions_are_counted_in_the_server_process(thread_pool_server):
    dev = thread_pool_server.connect()
    try:
        buf = dev.alloc(1 << 16)
        dev.write(buf, 0, np.ones(1 << 16, np.uint8))
        dev.write(buf, 0, b"\x02" * 10)
        dev.free(buf)
        dev.fill(buf, 0, 0, 16)                         # a freed buffer: INVALID_HANDLE
        with pytest.raises(harp.InvalidHandleError):
            dev.synchronize()
        other = dev.alloc(4096)
        assert len(dev.read(other, 0, 4096)) == 4096
        mine = _session_samples(thread_pool_server, dev)
        assert mine["harp_session_calls_total"] == dev._seq == 8
        assert mine["harp_session_write_bytes_total"] == (1 << 16) + 10
        assert mine["harp_session_read_bytes_total"] == 4096
        assert mine["harp_session_errors_total"] == 1
        assert mine["harp_session_memory_used_bytes"] == 4096
    finally:
        dev.close()


def test_a_same_host_windows_payload_is_counted_by_its_worker(unix_pool_server):
    dev = unix_pool_server.connect()
    try:
        assert dev.shared_memory
        n = 5 * (1 << 20) + 3
        buf = dev.alloc(n)
        dev.write(buf, 0, np.ones(n, np.uint8))
        assert len(dev.read(buf, 0, n)) == n
        for _ in range(3):              # the relay answers the later ones: counted there
            dev.synchronize()
        mine = _session_samples(unix_pool_server, dev)
        assert mine["harp_session_write_bytes_total"] == mine["harp_session_read_bytes_total"] == n
        assert mine["harp_session_received_bytes_total"] < 1 << 20
        assert mine["harp_session_sent_bytes_total"] < 1 << 20
        assert mine["harp_session_calls_total"] == dev._seq
    finally:
        dev.close()
