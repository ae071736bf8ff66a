"""Memory a worker process shares with the pool server is sealed at its size, and the
server maps none that is not: a worker able to shrink a file the server has mapped could
kill the server (its next touch of a vanished page is SIGBUS), and every tenant with it."""
from __future__ import annotations

import os

import pytest

from harp.errors import ProtocolError
from harp.server import counters, ipc
from harp.server.hosts import SessionHost
from harp.server.turnstile import Turnstile
from harp.shm import require_sealed, sealed_memfd


def test_a_workers_rings_and_counts_cannot_be_shrunk_or_grown():
    ring = ipc.SlotRing.create("harp-test", 1 << 16)
    counts = counters.SharedCounts.create()
    try:
        for fd, size in ((ring.fd, (1 << 16) * ipc.SLOTS), (counts.fd, counters.SIZE)):
            require_sealed(fd, size, "it")
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 0)
            with pytest.raises(PermissionError):
                os.ftruncate(fd, size * 2)
    finally:
        ring.close()
        counts.close()


def test_the_server_refuses_memory_that_is_not_sealed_or_not_its_size():
    loose = os.memfd_create("harp-test", os.MFD_CLOEXEC)
    try:
        os.ftruncate(loose, 4096)
        with pytest.raises(ProtocolError, match="not sealed"):
            require_sealed(loose, 4096, "its counts")
    finally:
        os.close(loose)
    small = sealed_memfd("harp-test", 4096)
    try:
        with pytest.raises(ProtocolError, match="4096 bytes, not 8192"):
            require_sealed(small, 8192, "its write ring")
    finally:
        os.close(small)


def test_the_data_listener_says_yes_before_the_session_may_use_the_socket():
    """Two threads on one TLS connection corrupt its records: the listener's yes to the
    client is sent before the socket becomes the session's, never beside its transfers."""
    host = SessionHost("s1", Turnstile(permits=1))
    seen: list = []
    assert host.attach_data("sock", lambda: seen.append(host.data))
    assert seen == [None] and host.data == "sock"
    assert not host.attach_data("another", lambda: seen.append("again"))   # has one
    assert seen == [None]


def test_a_transfer_that_arrives_during_the_handover_waits_for_it():
    """The client may send on the channel as soon as it has the yes: a data frame that
    reaches the handler while the listener is still handing the socket over waits for it
    (it was refused as 'a data frame in a session without a data channel')."""
    import threading
    host = SessionHost("s1", Turnstile(permits=1))
    yes_sent, go_on = threading.Event(), threading.Event()

    def accept():
        yes_sent.set()
        go_on.wait(5)          # the listener, slow to finish the handover

    listener = threading.Thread(target=host.attach_data, args=("sock", accept))
    listener.start()
    assert yes_sent.wait(5)
    found: list = []
    handler = threading.Thread(target=lambda: found.append(host._data_now()))
    handler.start()
    handler.join(0.2)
    assert handler.is_alive()          # waiting out the handover, not deciding without it
    go_on.set()
    handler.join(5)
    listener.join(5)
    assert found == ["sock"]
    host._require_data()               # and a data frame is accepted


def test_a_workers_write_ring_has_its_pages_before_the_server_writes_into_them():
    # Made by the worker while warm: the relay, which every session shares, must not be
    # the one to allocate and zero a new session's pages at its first writes.
    import socket
    from harp.server.worker import Worker
    pairs = [socket.socketpair() for _ in range(2)]
    worker = Worker(pairs[0][0], pairs[1][0], {"backend": "cpu", "chunk_size": 1 << 20})
    try:
        assert os.fstat(worker.writes.fd).st_blocks * 512 >= (1 << 20) * ipc.SLOTS
    finally:
        for ring in (worker.writes, worker.reads):
            ring.close()
        worker.counts.close()
        for a, b in pairs:
            a.close()
            b.close()
