"""A synchronize the pool server answers without the session's worker.

After a whole-device synchronize that drained the device, and before any other
frame reaches the worker, another whole-device synchronize can only succeed:
the relay answers it at once (`WorkerHost._answer_drained`). These tests hold
that shortcut to what it may assume: it is really taken (a stopped worker does
not stop it), anything else sent in between sends the next sync to the worker
(errors are not lost), sequence numbers still must increase, and a worker that
died while its session was drained is noticed at the next sync.
"""
from __future__ import annotations

import os
import signal

import grpc
import numpy as np
import pytest

import harp
from harp import security, wire
from harp.client.remote import ended_error
from harp.proto import session_pb2 as pb
from tests.conftest import wait_until

HANDSHAKE = pb.HandshakeRequest(
    versions=pb.VersionRange(min=wire.PROTOCOL_MIN, max=wire.PROTOCOL_MAX)).SerializeToString()


def _worker_pid(pool, dev):
    return next(s["pid"] for s in pool.server.session_stats() if s["session"] == dev.session_id)


def _gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _frames(pool, frames):
    """Raw frames after a handshake: what came back, and the session's final error."""
    with grpc.secure_channel(pool.address, security.channel_credentials(pool.client_tls)) as ch:
        call = ch.stream_stream(wire.METHOD)(iter([HANDSHAKE, *frames]), timeout=20)
        got = []
        try:
            for frame in call:
                got.append(frame)
        except grpc.RpcError as exc:
            got.append(ended_error(exc, "test"))
        return got


def _sync(seq):
    return wire.batch_frame([[wire.SYNCHRONIZE, seq, None]], True)


def test_a_drained_session_is_synchronized_without_its_worker(fresh_pool):
    with fresh_pool.connect() as dev:
        buf = dev.alloc(64)
        dev.write(buf, 0, b"x" * 64)
        dev.synchronize()                        # drains the device: the worker says so
        pid = _worker_pid(fresh_pool, dev)
        os.kill(pid, signal.SIGSTOP)             # a worker that cannot answer
        try:
            for _ in range(3):
                dev.synchronize()                # answered by the relay, at once
        finally:
            os.kill(pid, signal.SIGCONT)
        assert bytes(dev.read(buf, 0, 64)) == b"x" * 64     # the worker again
        dev.synchronize()


def test_work_sent_between_syncs_goes_to_the_worker_and_its_errors_come_back(fresh_pool):
    with fresh_pool.connect() as dev:
        lib = dev.load_module(harp.CATALOG_IMAGE, "catalog")
        fill = dev.function(lib, "fill_f32")
        noop = dev.function(lib, "noop")
        small = dev.alloc(16)
        dev.synchronize()
        # A launch the device refuses (1,000 elements into 16 bytes), in a batch the client
        # sends on its own when it is full, so that the next sync frame holds the sync alone.
        dev.launch(fill, 1, 1, [small, np.float32(1), np.int64(1000)])
        for _ in range(wire.BATCH_CALLS - 1):
            dev.launch(noop, 1, 1, [])
        with pytest.raises(harp.HarpError) as info:
            dev.synchronize()
        assert info.value.call == "launch"
        dev.synchronize()                        # reported once, then drained again


def test_sequence_numbers_must_still_increase_across_answered_syncs(fresh_pool):
    got = _frames(fresh_pool, [_sync(1), _sync(2), _sync(2)])
    assert [wire.msgpack.unpackb(f)[0] for f in got[1:3]] == [1, 2]
    assert isinstance(got[3], harp.ProtocolError) and "must increase" in str(got[3])
    # The worker hears of a sync it did not run: an async call numbered at or below it is
    # refused there too.
    got = _frames(fresh_pool, [_sync(1), _sync(5), wire.batch_frame(
        [[wire.ALLOC, 4, 7, 64], [wire.MEM_INFO, 6]], True)])
    assert [wire.msgpack.unpackb(f)[0] for f in got[1:3]] == [1, 5]
    assert isinstance(got[3], harp.ProtocolError) and "must increase" in str(got[3])
    # And numbers above it go on as usual.
    got = _frames(fresh_pool, [_sync(1), _sync(5), wire.batch_frame(
        [[wire.ALLOC, 6, 7, 64], [wire.MEM_INFO, 7]], True)])
    assert len(got) == 4 and wire.msgpack.unpackb(got[3])[:2] == [7, None]


def test_a_worker_that_died_while_drained_is_noticed_at_the_next_sync(fresh_pool):
    bystander = fresh_pool.connect()
    with fresh_pool.connect() as victim:
        victim.synchronize()
        pid = _worker_pid(fresh_pool, victim)
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: _gone(pid), 10)
        # the server hears of the exit from its fork server
        assert fresh_pool.server.workers.forks.exitcode(pid, 10) is not None
        with pytest.raises(harp.DeviceError, match="killed by SIGKILL"):
            victim.synchronize()
    bystander.synchronize()
    bystander.close()
