"""A session's frames move onto its data channel once it is open (protocol 3).

The client opens the data channel in the background at connect and, at the
next frame after it is open, tells the stream `FRAMES_ON_DATA`; from then on
its calls and the server's replies travel on the channel as length-prefixed
frames, in order with the bulk data already there. What must hold: every
call works the same, in both isolations; the server's reason still reaches a
client waiting on the channel; a dead server or link is still noticed; a
hostile frame on the channel (too long, cut short, a second switch) ends only
its own session; a client that goes away frees its session.
"""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap
import time
import types

import grpc
import numpy as np
import pytest

import harp
from harp import security, wire
from harp.client import datachannel
from harp.client.remote import ended_error
from harp.dataframes import HEADER, FrameChannel
from harp.errors import LeaseError, ProtocolError, TransportError
from harp.proto import session_pb2 as pb
from tests.conftest import Pool, pattern, wait_until

MiB = 1 << 20


def _on_data(dev) -> None:
    """Sync until the session's frames have moved to the data channel."""
    assert wait_until(lambda: (dev.synchronize(), dev.frames_on_data)[1], timeout=15)


def _server_host(pool, dev):
    return next(r.host for r in pool.server.session_records() if r.id == dev.session_id)


def test_every_kind_of_call_works_with_frames_on_the_data_channel(tcp_pool):
    dev = tcp_pool.connect()
    try:
        _on_data(dev)
        assert _server_host(tcp_pool, dev).frames_on_data
        lib = dev.load_module(harp.CATALOG_IMAGE, "catalog")
        axpy = dev.function(lib, "axpy_f32")
        n = 1000
        x, y = dev.alloc(4 * n), dev.alloc(4 * n)
        dev.write(x, 0, np.arange(n, dtype=np.float32))             # inline
        dev.write(y, 0, np.ones(n, np.float32))
        for _ in range(3):
            dev.launch(axpy, 1, 1, [y, x, np.float32(2.0), np.int64(n)])
        got = np.frombuffer(dev.read(y, 0, 4 * n), np.float32)
        assert np.array_equal(got, 1 + 6 * np.arange(n, dtype=np.float32))
        big = pattern(3 * wire.CHUNK_SIZE + 123)                   # on the channel too
        buf = dev.alloc(big.nbytes)
        dev.write(buf, 0, big)
        out = np.zeros(big.nbytes, np.uint8)
        dev.read(buf, 0, big.nbytes, out)
        assert np.array_equal(out, big)
        s = dev.stream()
        e0, e1 = dev.event(), dev.event()
        dev.record(e0, s)
        dev.copy(buf, 0, buf, 1, 1000, s)
        dev.record(e1, s)
        dev.synchronize(s)
        assert dev.elapsed(e0, e1) >= 0
        assert dev.mem_info().total > 0
        dev.free(x)
        dev.launch(axpy, 1, 1, [y, x, np.float32(1), np.int64(n)])   # x is gone
        with pytest.raises(harp.InvalidHandleError):
            dev.synchronize()
        assert dev.read(y, 0, 4)                                     # and the session goes on
        stats = next(s for s in tcp_pool.server.session_stats()
                     if s["session"] == dev.session_id)
        assert stats["bytes_in"] >= big.nbytes and stats["bytes_out"] >= big.nbytes
    finally:
        dev.close()
    assert wait_until(lambda: not tcp_pool.server.session_records())        # closed, not left


def test_opting_out_keeps_the_frames_on_the_stream(tcp_pool, monkeypatch):
    dev = tcp_pool.connect(frames_on_data=False)
    try:
        buf = dev.alloc(2 * MiB)
        dev.write(buf, 0, b"\x05" * (2 * MiB))                    # the data channel opens
        assert dev.data_channel and dev._data is not None
        assert dev.read(buf, 0, 2 * MiB) == b"\x05" * (2 * MiB)
        assert not dev.frames_on_data
        assert not _server_host(tcp_pool, dev).frames_on_data
    finally:
        dev.close()
    monkeypatch.setenv("HARP_FRAMES_ON_DATA", "0")
    with tcp_pool.connect() as dev:
        for _ in range(20):
            dev.synchronize()
        assert not dev.frames_on_data


def test_the_servers_reason_reaches_a_client_waiting_on_the_data_channel(tcp_pool):
    dev = tcp_pool.connect()
    try:
        _on_data(dev)
        record = next(r for r in tcp_pool.server.session_records() if r.id == dev.session_id)
        tcp_pool.server.end_session(record, LeaseError("the lease is over"))
        with pytest.raises(LeaseError, match="the lease is over"):
            dev.synchronize()
        with pytest.raises(LeaseError):                      # and stays so
            dev.mem_info()
    finally:
        dev.close()
    with tcp_pool.connect() as other:                                # the server goes on
        _on_data(other)


def _raw_session(pool):
    """A session whose frames we write ourselves on its data channel."""
    dev = pool.connect()
    _on_data(dev)
    return dev, dev._data


@pytest.mark.parametrize("bad", ["too long", "cut short", "switch again", "empty",
                                 "garbage batch"])
def test_a_hostile_frame_on_the_data_channel_ends_only_its_own_session(fresh_pool, bad):
    bystander = fresh_pool.connect()
    _on_data(bystander)
    dev, sock = _raw_session(fresh_pool)
    sid = dev.session_id
    if bad == "too long":
        sock.sendall(HEADER.pack(wire.MAX_FRAME + 1) + b"x" * 64)
    elif bad == "cut short":
        sock.sendall(HEADER.pack(1000) + b"\x02" * 10)
        sock.close()
    elif bad == "switch again":
        FrameChannel(sock).send(wire.FRAMES_ON_DATA_TAG)
    elif bad == "empty":
        FrameChannel(sock).send(b"")
    else:
        FrameChannel(sock).send(bytes((wire.BATCH_SYNC,)) + b"\xc1\xc1\xc1")
    assert wait_until(lambda: all(r.id != sid for r in fresh_pool.server.session_records()))
    if bad != "cut short":
        with pytest.raises((ProtocolError, TransportError)):
            dev.synchronize()
    dev.close()
    buf = bystander.alloc(4)                                         # untouched
    bystander.write(buf, 0, b"abcd")
    assert bystander.read(buf, 0, 4) == b"abcd"
    bystander.close()


def _switch_refused(pool, handshake: pb.HandshakeRequest) -> ProtocolError:
    """A raw session that says `handshake`, then `FRAMES_ON_DATA`: the error it ends with."""
    creds = security.channel_credentials(pool.client_tls)
    with grpc.secure_channel(pool.address, creds) as channel:
        frames = iter([handshake.SerializeToString(), wire.FRAMES_ON_DATA_TAG])
        call = channel.stream_stream(wire.METHOD)(frames, timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            for _ in call:
                pass
    error = ended_error(info.value, "test")
    assert isinstance(error, ProtocolError), error
    return error


def test_frames_on_data_in_a_session_without_a_data_channel_are_refused(fresh_pool):
    _switch_refused(fresh_pool, pb.HandshakeRequest(versions=pb.VersionRange(
        min=wire.PROTOCOL_MIN, max=wire.PROTOCOL_MAX)))
    with fresh_pool.connect() as dev:
        dev.synchronize()


def test_a_client_killed_with_frames_on_the_data_channel_frees_its_session(fresh_pool):
    script = textwrap.dedent(f"""
        import sys, time, harp
        from harp.security import TlsFiles
        tls = TlsFiles({str(fresh_pool.client_tls.ca)!r}, {str(fresh_pool.client_tls.cert)!r},
                       {str(fresh_pool.client_tls.key)!r})
        dev = harp.connect({fresh_pool.url!r}, tls=tls)
        t0 = time.monotonic()
        while not dev.frames_on_data and time.monotonic() - t0 < 15:
            dev.synchronize()
        print("ON" if dev.frames_on_data else "OFF", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ON"
        assert wait_until(lambda: len(fresh_pool.server.session_records()) == 1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert wait_until(lambda: not fresh_pool.server.session_records(), timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    with fresh_pool.connect() as dev:
        dev.synchronize()


def test_a_dead_link_fails_a_call_waiting_on_the_data_channel(fresh_pool, monkeypatch):
    """Both connections go silent: the call waiting on the data channel fails once gRPC's
    keepalive finds the stream's link dead (the channel itself has no timeout while it
    waits for a reply: a kernel may run long)."""
    from tests.remote.test_failures import (BlackHoleProxy,
                                            sync_fails_once_keepalive_finds_the_link_dead)
    listener = next(iter(fresh_pool.server.data_listeners.values()))
    stream_proxy = BlackHoleProxy(fresh_pool.address)
    data_proxy = BlackHoleProxy(f"127.0.0.1:{listener.port}")
    data_proxy.dead = stream_proxy.dead                            # one cut for both
    to_proxy = int(data_proxy.address.rsplit(":", 1)[1])

    def through_proxy(address, *args, **kwargs):
        if address[1] == listener.port:
            address = ("127.0.0.1", to_proxy)
        return socket.create_connection(address, *args, **kwargs)
    # the client's opener alone dials the data channel through its proxy
    monkeypatch.setattr(datachannel, "socket", types.SimpleNamespace(
        **{**vars(socket), "create_connection": through_proxy}))
    try:
        dev = harp.connect(f"harp://{stream_proxy.address}", tls=fresh_pool.client_tls,
                           keepalive_s=1, keepalive_timeout_s=1)
        _on_data(dev)
        sync_fails_once_keepalive_finds_the_link_dead(dev, stream_proxy.dead)
    finally:
        stream_proxy.close()
        data_proxy.close()


def test_frames_survive_interleaving_with_payloads_and_threads(tcp_pool):
    """Calls from several threads (serialized by the device), large and small, while the
    switch happens: nothing is lost or reordered."""
    import threading
    dev = tcp_pool.connect()
    try:
        bufs = [dev.alloc(2 * MiB) for _ in range(4)]
        errors = []

        def work(i):
            try:
                for k in range(6):
                    data = pattern(MiB + 17 * k, seed=i * 10 + k)
                    dev.write(bufs[i], 3, data)
                    small = bytes([i, k]) * 8
                    dev.write(bufs[i], 0, small[:3])
                    got = np.zeros(data.nbytes, np.uint8)
                    dev.read(bufs[i], 3, data.nbytes, got)
                    assert np.array_equal(got, data)
                    assert dev.read(bufs[i], 0, 3) == small[:3]
            except Exception as exc:  # reported below
                errors.append(exc)
        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert dev.frames_on_data
    finally:
        dev.close()


def test_back_pressure_longer_than_the_io_timeout_does_not_break_the_session(tmp_path,
                                                                              monkeypatch):
    """Kernels queued for seconds, then more inline writes than the server queues
    (`MAX_QUEUED_BYTES`): the server stops reading the channel meanwhile, longer than the
    channel's IO timeout (lowered to 1 s here), and the client's sends wait, as they would
    on gRPC's flow control, instead of failing."""
    monkeypatch.setattr(datachannel, "IO_TIMEOUT_S", 1.0)
    pool = Pool(tmp_path, isolation="thread", warm_workers=1)
    dev = pool.connect()
    try:
        _on_data(dev)
        assert dev._data.gettimeout() is None
        lib = dev.load_module(harp.CATALOG_IMAGE, "catalog")
        axpy = dev.function(lib, "axpy_f32")
        n = 16 << 20
        x, y, small = dev.alloc(4 * n), dev.alloc(4 * n), dev.alloc(64 << 10)
        dev.synchronize()
        t0 = time.monotonic()
        for _ in range(200):                         # seconds of queued kernels
            dev.launch(axpy, 1, 1, [y, x, np.float32(1.0), np.int64(n)])
        blob = b"\x07" * (64 << 10)
        for _ in range(1400):                        # > 64 MiB of queued inline writes
            dev.write(small, 0, blob)
        dev.synchronize()
        print(f"back-pressure held the sends for up to {time.monotonic() - t0:.1f} s")
        assert dev.read(small, 0, 8) == b"\x07" * 8
    finally:
        dev.close()
        pool.stop()


def test_a_protocol_2_session_may_not_move_its_frames(fresh_pool):
    error = _switch_refused(fresh_pool, pb.HandshakeRequest(
        versions=pb.VersionRange(min=2, max=2), data_channel=True))
    assert "protocol 2" in str(error)


def test_an_opener_that_raises_leaves_the_session_on_the_stream(fresh_pool, monkeypatch):
    """The background open must always finish: a device waiting on it holds its lock."""
    def broken(*args, **kwargs):
        def open_channel(offer):
            raise RuntimeError("a bug in the opener")
        return open_channel
    monkeypatch.setattr("harp.client.connect.opener", broken)
    dev = fresh_pool.connect()
    try:
        buf = dev.alloc(2 * MiB)
        data = pattern(2 * MiB, seed=5)
        dev.write(buf, 0, data)                        # waits for the open, which failed
        assert not dev.data_channel and not dev.frames_on_data
        assert dev.read(buf, 0, 2 * MiB) == data.tobytes()
    finally:
        dev.close()


def test_a_session_on_the_data_channel_cannot_name_another_sessions_handles(tcp_pool):
    """The frames moved, not the checks: session B forging session A's buffer id on its
    data channel is refused, and A's bytes stay as they were."""
    a, b = tcp_pool.connect(), tcp_pool.connect()
    try:
        _on_data(a)
        _on_data(b)
        mine = a.alloc(2 * MiB)
        data = pattern(2 * MiB, seed=9)
        a.write(mine, 0, data)
        b.write(mine, 0, b"\xff" * 64)                 # inline, and on the channel
        b.write(mine, 0, b"\xff" * (2 * MiB))
        with pytest.raises(harp.InvalidHandleError):
            b.synchronize()
        with pytest.raises(harp.InvalidHandleError):
            b.read(mine, 0, 2 * MiB)
        assert a.read(mine, 0, 2 * MiB) == data.tobytes()
        own = b.alloc(8)                                  # and B goes on
        b.write(own, 0, b"12345678")
        assert b.read(own, 0, 8) == b"12345678"
    finally:
        a.close()
        b.close()
