"""Same-host sessions move bulk data through a shared-memory window (`harp.shm`).

On a unix socket a session picks up its window at the server's door and its
large writes and reads go through it, in both isolations; anywhere else, or
when the door cannot be reached, the stream carries them as before. The door
gives a window only for its one-time ticket; the window's size is sealed; a
client that lies in the window ends only its own session; and a client that
goes mid-transfer leaves no session behind.
"""
from __future__ import annotations

import os
import socket
import time

import numpy as np
import pytest

import harp
from harp import shm, wire
from harp.errors import HarpError, ProtocolError
from harp.server.door import Door
from tests.conftest import Pool, pattern, unix_listen, wait_until as _wait_until

MiB = 1 << 20



@pytest.fixture(params=["process", "thread"])
def unix_pool(request, tmp_path):
    pool = Pool(tmp_path, listen=unix_listen(), isolation=request.param, warm_workers=1)
    yield pool
    pool.stop()


def test_a_unix_session_moves_bulk_data_through_its_window(unix_pool):
    dev = unix_pool.connect()
    try:
        assert dev.shared_memory
        n = 3 * shm.SLOT_SIZE * shm.SLOTS + 12345         # more than a ring, not whole slots
        data = pattern(n)
        buf = dev.alloc(n + 100)
        dev.write(buf, 100, data)
        out = np.zeros(n, np.uint8)
        dev.read(buf, 100, n, out)
        assert np.array_equal(out, data)
        # no out: bytes, and an offset inside the buffer
        assert dev.read(buf, 100 + 7, 2 * MiB) == data[7:7 + 2 * MiB].tobytes()
        # the bytes did not cross the stream: a few small frames only
        stats = next(s for s in unix_pool.server.session_stats()
                     if s["session"] == dev.session_id)
        assert stats["bytes_in"] < MiB and stats["bytes_out"] < MiB
    finally:
        dev.close()


def test_tcp_and_opted_out_sessions_take_the_stream(unix_pool, tmp_path, monkeypatch):
    dev = unix_pool.connect(shared_memory=False)
    try:
        assert not dev.shared_memory
        buf = dev.alloc(2 * MiB)
        dev.write(buf, 0, b"\x07" * (2 * MiB))
        assert dev.read(buf, 0, 2 * MiB) == b"\x07" * (2 * MiB)
    finally:
        dev.close()
    monkeypatch.setenv("HARP_SHARED_MEMORY", "0")
    dev = unix_pool.connect()
    assert not dev.shared_memory
    dev.close()
    tcp = Pool(tmp_path / "tcp")                          # loopback TCP: no door at all
    try:
        assert not tcp.server.doors
        dev = tcp.connect()
        assert not dev.shared_memory
        dev.close()
    finally:
        tcp.stop()


def test_a_server_can_offer_no_window(tmp_path):
    pool = Pool(tmp_path, listen=unix_listen(), shared_memory=False, warm_workers=1)
    try:
        dev = pool.connect()
        assert not dev.shared_memory
        dev.close()
    finally:
        pool.stop()


def test_an_unreachable_door_leaves_the_session_on_the_stream(unix_pool):
    door = unix_pool.server.doors[0]
    os.unlink(door.path)                                  # as if in another mount namespace
    dev = unix_pool.connect()
    try:
        assert not dev.shared_memory
        buf = dev.alloc(4 * MiB)
        data = pattern(4 * MiB, 1)
        dev.write(buf, 0, data)
        assert dev.read(buf, 0, 4 * MiB) == data.tobytes()
    finally:
        dev.close()


def test_the_door_gives_a_window_once_and_only_for_its_ticket(tmp_path, monkeypatch):
    door = Door(str(tmp_path / "door"))
    door.start()
    window = shm.SharedWindow.create(4096, 2)
    try:
        with pytest.raises(OSError):
            shm.pick_up(door.path, os.urandom(shm.TICKET_BYTES))   # a forged ticket
        ticket = door.offer(window.fds())
        fds = shm.pick_up(door.path, ticket)
        assert len(fds) == 3
        assert os.fstat(fds[0]).st_ino == os.fstat(window.fd).st_ino
        shm.close_all(fds)
        with pytest.raises(OSError):
            shm.pick_up(door.path, ticket)                          # good once
        monkeypatch.setattr(door.tickets, "ttl_s", 0.0)
        late = door.offer(window.fds())
        time.sleep(0.01)
        with pytest.raises(OSError):
            shm.pick_up(door.path, late)                            # expired
        # a caller that shows nothing does not hold the door for long
        idle = socket.socket(socket.AF_UNIX)
        idle.connect(door.path)
        monkeypatch.setattr(door.tickets, "ttl_s", 10.0)
        fds = shm.pick_up(door.path, door.offer(window.fds()), timeout=5)
        shm.close_all(fds)
        idle.close()
    finally:
        window.close()
        door.stop()
    assert not os.path.exists(door.path)


def test_a_window_cannot_be_resized_by_either_side():
    window = shm.SharedWindow.create(4096, 2)
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(window.fd, 0)
        with pytest.raises(PermissionError):
            os.ftruncate(window.fd, 1 << 30)
    finally:
        window.close()


def test_a_client_refuses_an_unsealed_window():
    fd = os.memfd_create("x", os.MFD_CLOEXEC)
    os.ftruncate(fd, shm.window_bytes(4096, 2))
    with pytest.raises(ProtocolError, match="not sealed"):
        shm.SharedWindow.attach([fd, os.eventfd(0), os.eventfd(0)], 4096, 2, client=True)


def test_a_client_that_lies_in_its_window_ends_only_its_own_session(unix_pool):
    other = unix_pool.connect()
    liar = unix_pool.connect()
    try:
        assert liar.shared_memory
        keep = other.alloc(2 * MiB)
        other.write(keep, 0, b"\x05" * (2 * MiB))
        buf = liar.alloc(8 * MiB)
        liar.synchronize()
        # a write of 8 MiB, whose first chunk claims more bytes than a slot holds
        window = liar._window
        with liar._lock:
            liar._send(liar._proto.shm_write([wire.WRITE_SHM, liar._next(), buf.id, 0, 0,
                                              8 * MiB]))
            window._words[window._size_word(0)] = 1 << 40
            window._words[0] = shm.FULL
            window._wake()
        with pytest.raises(HarpError) as caught:
            liar.synchronize()
        assert "shared-memory write chunk" in str(caught.value)
        assert other.read(keep, 0, 2 * MiB) == b"\x05" * (2 * MiB)
        fresh = unix_pool.connect()
        assert fresh.shared_memory
        fresh.close()
    finally:
        liar.close()
        other.close()


def _open_sessions(pool):
    return len(pool.server.session_records())


def test_a_client_gone_mid_read_leaves_no_session(unix_pool):
    dev = unix_pool.connect()
    n = 4 * shm.SLOT_SIZE * shm.SLOTS
    buf = dev.alloc(n)
    dev.synchronize()
    assert _open_sessions(unix_pool) == 1
    with dev._lock:          # the read's chunks are never taken: the server waits on us
        dev._send(dev._proto.sync([wire.READ_SHM, dev._next(), buf.id, 0, n, 0]))
    assert _wait_until(lambda: dev._window._words[dev._window.slots] == shm.FULL)
    dev._call.cancel()                                    # and then we go
    assert _wait_until(lambda: _open_sessions(unix_pool) == 0)
    dev.close()
    again = unix_pool.connect()                           # the server is fine
    b = again.alloc(2 * MiB)
    again.write(b, 0, b"\x01" * (2 * MiB))
    assert again.read(b, 0, 2 * MiB) == b"\x01" * (2 * MiB)
    again.close()


def test_a_client_gone_mid_write_leaves_no_session(unix_pool):
    dev = unix_pool.connect()
    n = 4 * shm.SLOT_SIZE
    buf = dev.alloc(n)
    dev.synchronize()
    with dev._lock:          # a write of four chunks, of which only one is put
        dev._send(dev._proto.shm_write([wire.WRITE_SHM, dev._next(), buf.id, 0, 0, n]))
        dev._window.put(memoryview(b"\x02" * shm.SLOT_SIZE), lambda: True)
    dev._call.cancel()
    assert _wait_until(lambda: _open_sessions(unix_pool) == 0)
    dev.close()


def test_a_read_after_a_failed_async_call_raises_it_and_leaves_out_alone(unix_pool):
    dev = unix_pool.connect()
    try:
        buf = dev.alloc(4 * MiB)
        dev.write(buf, 0, b"\x03" * (4 * MiB))
        dev.free(harp.types.Buffer(0xBAD, 16))            # fails on the server, async
        out = bytearray(b"\xee" * (4 * MiB))
        with pytest.raises(HarpError, match="free"):
            dev.read(buf, 0, 4 * MiB, out)
        assert out == b"\xee" * (4 * MiB)
        assert dev.read(buf, 0, 4 * MiB) == b"\x03" * (4 * MiB)   # the session goes on
        with pytest.raises(HarpError, match="not allocated"):
            dev.read(harp.types.Buffer(0xBAD, 4 * MiB), 0, 4 * MiB)
        dev.write(harp.types.Buffer(0xBAD, 4 * MiB), 0, b"\x04" * (4 * MiB))
        with pytest.raises(HarpError, match="write"):
            dev.synchronize()
        assert dev.read(buf, 0, 4 * MiB) == b"\x03" * (4 * MiB)
    finally:
        dev.close()


def test_shared_memory_records_in_a_session_without_a_window_are_protocol_errors(tmp_path):
    tcp = Pool(tmp_path, warm_workers=1)
    try:
        for op, record in ((wire.READ_SHM, [0, 0, 4 * MiB, 0]), (wire.WRITE_SHM, [0, 0, 0, MiB])):
            dev = tcp.connect()
            buf = dev.alloc(4 * MiB)
            record[0] = buf.id
            with dev._lock:
                if op == wire.READ_SHM:
                    dev._send(dev._proto.sync([op, dev._next(), *record]))
                    with pytest.raises(ProtocolError, match="without a window"):
                        dev._frame("read")
                else:
                    dev._send(dev._proto.shm_write([op, dev._next(), *record]))
            if op == wire.WRITE_SHM:
                with pytest.raises(ProtocolError, match="without a window"):
                    dev.synchronize()
            dev.close()
        assert _wait_until(lambda: not tcp.server.session_records())
        again = tcp.connect()                            # and the server goes on
        again.synchronize()
        again.close()
    finally:
        tcp.stop()


def test_a_window_never_picked_up_is_let_go_when_its_session_ends(unix_pool, monkeypatch):
    monkeypatch.setattr("harp.client.remote._take_window", lambda offer: None)
    dev = unix_pool.connect()
    assert not dev.shared_memory
    door = unix_pool.server.doors[0]
    assert len(door.tickets._tickets) == 1                # held for the client, unclaimed
    dev.close()
    assert _wait_until(lambda: not door.tickets._tickets)   # and closed with the session
