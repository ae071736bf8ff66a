"""TCP sessions move bulk data over a mutual-TLS data channel beside the gRPC stream.

A session over TCP with TLS opens the data channel its server offers, and its
large writes and reads go over it, in both isolations; without TLS, over a
unix socket, when either side opts out or the listener cannot be reached, the
stream carries them as before. The listener takes a ticket once, only from
the session's own identity; a client that stops short or lies about a
write's size ends only its own session.
"""
from __future__ import annotations

import socket
import ssl
import threading
import types

import grpc
import numpy as np
import pytest

import harp
from harp import security, wire
from harp.client.datachannel import opener
from harp.client.remote import RemoteDevice
from harp.errors import TransportError
from harp.server.turnstile import Turnstile
from harp.transport import channel_options, recv_into_exactly
from tests.conftest import Pool, pattern, wait_until

MiB = 1 << 20


def test_a_tcp_session_moves_bulk_data_over_its_data_channel(tcp_pool):
    dev = tcp_pool.connect()
    try:
        assert dev.data_channel and not dev.shared_memory
        assert dev._data is None              # opening in the background, taken at a frame
        n = 5 * wire.CHUNK_SIZE + 777                      # not whole chunks
        data = pattern(n)
        buf = dev.alloc(n + 64)
        dev.write(buf, 64, data)
        out = np.zeros(n, np.uint8)
        assert dev._data is not None
        dev.read(buf, 64, n, out)
        assert np.array_equal(out, data)
        stats = next(x for x in tcp_pool.server.session_stats()
                     if x["session"] == dev.session_id)
        assert stats["bytes_in"] >= n and stats["bytes_out"] >= n   # counted, off the stream
        assert dev.read(buf, 64 + 3, 2 * MiB) == data[3:3 + 2 * MiB].tobytes()
        dev.write(buf, 0, b"\x09" * 100)                  # small ones stay inline
        assert dev.read(buf, 0, 100) == b"\x09" * 100
    finally:
        dev.close()


def test_opting_out_or_plain_text_or_no_listener_keeps_the_stream(tcp_pool, tmp_path,
                                                                   monkeypatch):
    dev = tcp_pool.connect(data_channel=False)
    assert not dev.data_channel
    buf = dev.alloc(2 * MiB)
    dev.write(buf, 0, b"\x01" * (2 * MiB))
    assert dev.read(buf, 0, 2 * MiB) == b"\x01" * (2 * MiB)
    dev.close()
    monkeypatch.setenv("HARP_DATA_CHANNEL", "0")
    dev = tcp_pool.connect()
    assert not dev.data_channel
    dev.close()
    monkeypatch.delenv("HARP_DATA_CHANNEL")
    off = Pool(tmp_path / "off", data_channel=False, warm_workers=1)
    try:
        assert not off.server.data_listeners
        dev = off.connect()
        assert not dev.data_channel
        dev.close()
    finally:
        off.stop()
    for listener in tcp_pool.server.data_listeners.values():
        listener.stop()                                   # offered, but nobody answers
    dev = tcp_pool.connect()
    try:
        buf = dev.alloc(3 * MiB)
        data = pattern(3 * MiB, 2)
        dev.write(buf, 0, data)                           # tries to open it, and cannot
        assert not dev.data_channel
        assert dev.read(buf, 0, 3 * MiB) == data.tobytes()
    finally:
        dev.close()


def test_a_plain_text_server_offers_no_data_channel(tmp_path):
    from harp.backends import load_backend
    from harp.server import PoolServer
    server = PoolServer(load_backend("cpu", memory="256MiB"), warm_workers=1)
    address = server.start(["127.0.0.1:0"], None)[0]
    try:
        assert not server.data_listeners
        dev = harp.connect(f"harp+insecure://{address}")
        assert not dev.data_channel
        dev.close()
    finally:
        server.stop()


def _offer_of(pool):
    """A session whose data channel offer we keep instead of opening it."""
    channel = grpc.secure_channel(pool.address, security.channel_credentials(pool.client_tls),
                                  options=channel_options())
    dev = RemoteDevice(channel, open_data_channel=lambda offer: None, frames_on_data=False)
    return dev, dev._data_offer


def _show(pool, files, ticket):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(files.ca))
    context.load_cert_chain(str(files.cert), str(files.key))
    with socket.create_connection(("127.0.0.1", pool.server.data_port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(ticket)
            return tls.recv(1)


def test_the_listener_takes_a_ticket_once_and_only_from_its_identity(tcp_pool, tmp_path):
    dev, offer = _offer_of(tcp_pool)
    try:
        ca_dir = tcp_pool.client_tls.ca.parent
        cert, key = security.issue(ca_dir, "client", "mallory", days=1)
        mallory = security.TlsFiles(tcp_pool.client_tls.ca, cert, key)
        assert _show(tcp_pool, tcp_pool.client_tls, b"\x00" * 32) == b"\x00"   # forged
        assert _show(tcp_pool, mallory, offer.ticket) == b"\x00"           # someone else
        dev2, offer2 = _offer_of(tcp_pool)
        assert _show(tcp_pool, tcp_pool.client_tls, offer2.ticket) == b"\x01"
        assert _show(tcp_pool, tcp_pool.client_tls, offer2.ticket) == b"\x00"  # once
        dev2.close()
        # a peer that connects and says nothing is cut off, and others get through
        idle = socket.create_connection(("127.0.0.1", tcp_pool.server.data_port))
        fresh = tcp_pool.connect()
        assert fresh.data_channel
        fresh.close()
        idle.close()
    finally:
        dev.close()


def _begin_write(dev, buf, n, first):
    """A chunked write of `n` bytes into `buf` on `dev`'s data channel, of which only
    `first` is sent (the caller holds `dev._lock`)."""
    assert dev._data_socket() is not None
    dev._send(dev._proto.chunked_write([wire.WRITE_CHUNKED, dev._next(), buf.id, 0, 0, n]))
    dev._send(dev._proto.data_frame(n))
    dev._data.sendall(first)


def test_a_client_that_stops_short_ends_only_its_own_session(tcp_pool):
    other = tcp_pool.connect()
    keep = other.alloc(2 * MiB)
    other.write(keep, 0, b"\x05" * (2 * MiB))
    dev = tcp_pool.connect()
    n = 4 * MiB
    buf = dev.alloc(n)
    dev.synchronize()
    with dev._lock:
        _begin_write(dev, buf, n, b"\x07" * MiB)         # a quarter, then gone
        dev._data.close()
        dev._data = None
    assert wait_until(lambda: len(tcp_pool.server.session_records()) == 1)
    with pytest.raises(TransportError, match="data channel"):
        dev.synchronize()
    dev.close()
    assert other.read(keep, 0, 2 * MiB) == b"\x05" * (2 * MiB)
    other.close()


def _writes_meanwhile(other, seed):
    """`other` writes 6 MiB well inside the stalled session's 30 s (`IO_TIMEOUT_S`)."""
    data = pattern(6 * MiB, seed)
    keep = other.alloc(data.nbytes)
    done = {}
    writer = threading.Thread(target=lambda: done.update(
        ok=(other.write(keep, 0, data), other.synchronize())), daemon=True)
    writer.start()
    writer.join(15)
    assert "ok" in done, "another session's write waited on the stalled one"
    assert other.read(keep, 0, data.nbytes) == data.tobytes()


def test_a_client_stalled_halfway_through_a_write_holds_up_no_other_session(tcp_pool):
    """Sessions take turns at decrypting their writes (`server.turnstile`); with a single
    turn at a time, one whose client stops halfway through a write must not keep it
    from the others until its channel times out (`IO_TIMEOUT_S`, 30 s)."""
    turns = tcp_pool.server.turns = Turnstile(permits=1, stall_s=0.05)
    stalled = tcp_pool.connect()
    n = 4 * MiB
    buf = stalled.alloc(n)
    stalled.synchronize()
    with stalled._lock:
        _begin_write(stalled, buf, n, b"\x07" * (MiB // 2))   # half a slot, then a pause
    assert wait_until(lambda: turns._held)                # its handler holds the turn
    other = tcp_pool.connect()
    try:
        _writes_meanwhile(other, 3)
        assert turns.revoked >= 1                         # a turn taken from it
        with stalled._lock:                               # the stalled one goes on, and
            stalled._data.sendall(b"\x07" * (n - MiB // 2))   # its write lands whole
        assert stalled.read(buf, 0, n) == b"\x07" * n
        careful = {r.id: r.host._careful for r in tcp_pool.server.session_records()}
        assert careful == {stalled.session_id: True, other.session_id: False}
    finally:
        other.close()
        stalled.close()


def test_a_client_that_does_not_read_its_read_holds_up_no_other_session(tcp_pool):
    """A large read's payload is sent without a turn: a client that asks for one and does
    not read it leaves only its own handler waiting in `send`."""
    turns = tcp_pool.server.turns = Turnstile(permits=1, stall_s=60)   # no revocation
    reader = tcp_pool.connect()
    n = 64 * MiB                                          # far more than the buffers hold
    buf = reader.alloc(n)
    reader.write(buf, 0, b"\x03" * n)
    reader.synchronize()
    with reader._lock:
        reader._sync([wire.READ, reader._next(), buf.id, 0, n, 0])   # the reply; then
    other = tcp_pool.connect()                            # the payload, unread
    try:
        _writes_meanwhile(other, 4)
        assert turns.revoked == 0                         # no turn held by the reader
        got = memoryview(bytearray(n))
        with reader._lock:                                # the payload, late but whole
            recv_into_exactly(reader._data, got)
        assert got.tobytes() == b"\x03" * n
        reader.synchronize()
    finally:
        other.close()
        reader.close()


def test_a_data_frame_that_lies_about_the_size_ends_the_session(tcp_pool):
    dev = tcp_pool.connect()
    buf = dev.alloc(4 * MiB)
    dev.synchronize()
    with dev._lock:
        assert dev._data_socket() is not None
        dev._send(dev._proto.chunked_write([wire.WRITE_CHUNKED, dev._next(), buf.id, 0, 0,
                                            2 * MiB]))
        dev._send(dev._proto.data_frame(3 * MiB))
        try:
            dev._data.sendall(b"\x01" * (3 * MiB))
        except OSError:
            pass
    with pytest.raises(harp.ProtocolError):
        dev.synchronize()
    dev.close()
    assert wait_until(lambda: not tcp_pool.server.session_records())


def test_a_data_frame_without_a_data_channel_is_a_protocol_error(tcp_pool):
    dev = tcp_pool.connect(data_channel=False)
    buf = dev.alloc(2 * MiB)
    with dev._lock:
        dev._send(dev._proto.chunked_write([wire.WRITE_CHUNKED, dev._next(), buf.id, 0, 0,
                                            2 * MiB]))
        dev._send(dev._proto.data_frame(2 * MiB))
    with pytest.raises(harp.ProtocolError, match="data"):
        dev.synchronize()
    dev.close()


def test_the_opener_checks_the_server_certificate(tcp_pool, tmp_path):
    other_ca = tmp_path / "other"
    _, foreign = security.ephemeral_pool(other_ca)       # a client of another pool
    open_channel = opener(tcp_pool.address, foreign, None)
    assert open_channel(types.SimpleNamespace(port=tcp_pool.server.data_port,
                                              ticket=b"\x00" * 32)) is None
