"""The pool server's turns at decrypting bulk bytes (`server.turnstile`).

Permits go to waiting threads in the order they came, a permit given back goes to
the first in line (never to a thread that did not wait), a holder stuck for
`stall_s` while others wait loses its permit, and `receive_into` fills a buffer
from a real TLS connection holding one.
"""
from __future__ import annotations

import os
import socket
import ssl
import threading
import time

import pytest

from harp import security
from harp.server import turnstile
from harp.server.turnstile import Turnstile, receive_into
from tests.conftest import wait_until


def _queue_up(turns: Turnstile, names: list[str], order: list[str]) -> list[threading.Thread]:
    """Start one thread per name, each in line before the next starts."""
    threads = []
    for name in names:
        def run(name: str = name) -> None:
            grant = turns.enter()
            order.append(name)
            turns.leave(grant)
        t = threading.Thread(target=run, daemon=True)
        before = turns.waiting()
        t.start()
        assert wait_until(lambda: turns.waiting() == before + 1)
        threads.append(t)
    return threads


def test_waiting_threads_are_admitted_in_the_order_they_came():
    turns = Turnstile(permits=1, stall_s=60)
    grant = turns.enter()
    order: list[str] = []
    threads = _queue_up(turns, ["a", "b", "c", "d"], order)
    assert order == []                       # nobody passes the holder
    turns.leave(grant)
    for t in threads:
        t.join(10)
    assert order == ["a", "b", "c", "d"]
    assert turns.handoffs == 4 and turns.revoked == 0
    assert turns.enter() and turns.waiting() == 0   # the permit is free again


def test_a_permit_given_back_goes_to_the_line_not_to_the_thread_that_gave_it():
    turns = Turnstile(permits=1, stall_s=60)
    grant = turns.enter()
    order: list[str] = []
    threads = _queue_up(turns, ["waiter"], order)
    turns.leave(grant)
    again = turns.enter()                    # behind the waiter, who has the permit now
    order.append("holder")
    turns.leave(again)
    threads[0].join(10)
    assert order == ["waiter", "holder"]


def test_several_permits_admit_that_many_at_once():
    turns = Turnstile(permits=3, stall_s=60)
    grants = [turns.enter() for _ in range(3)]     # none waits
    order: list[str] = []
    threads = _queue_up(turns, ["x"], order)
    turns.leave(grants[1])
    threads[0].join(10)
    assert order == ["x"]
    for g in (grants[0], grants[2]):
        turns.leave(g)
    assert [turns.enter() for _ in range(3)]       # all three free again
    with pytest.raises(ValueError):
        Turnstile(permits=0)


def test_a_stalled_holder_loses_its_permit_to_the_first_in_line():
    turns = Turnstile(permits=1, stall_s=0.05)
    stuck = turns.enter()                    # and never gives it back in time
    order: list[str] = []
    threads = _queue_up(turns, ["a", "b"], order)
    for t in threads:
        t.join(30)
    assert order == ["a", "b"]
    assert turns.revoked == 1                # a's by revocation, b's handed over by a
    turns.leave(stuck)                       # late: its permit has gone on already
    grants = [turns.enter()]                 # exactly one permit is free
    order2: list[str] = []
    late = _queue_up(turns, ["c"], order2)
    assert order2 == []
    turns.leave(grants[0])
    late[0].join(10)
    assert order2 == ["c"]


def test_the_default_is_a_permit_per_core_this_process_may_use():
    assert Turnstile().permits == len(os.sched_getaffinity(0))


# -- receive_into, over a real TLS connection -----------------------------------------

@pytest.fixture
def tls_pair(tmp_path):
    """Connected (server side, client side) TLS sockets with the pool's certificates."""
    server_files, client_files = security.ephemeral_pool(tmp_path)
    server_ctx = security.ssl_server_context(server_files)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(str(client_files.ca))
    client_ctx.load_cert_chain(str(client_files.cert), str(client_files.key))
    client_ctx.check_hostname = False
    pairs = []

    def make():
        listener = socket.create_server(("127.0.0.1", 0))
        got = {}
        accept = threading.Thread(target=lambda: got.update(
            s=server_ctx.wrap_socket(listener.accept()[0], server_side=True)))
        accept.start()
        client = client_ctx.wrap_socket(socket.create_connection(listener.getsockname()))
        accept.join(10)
        listener.close()
        got["s"].settimeout(20)
        pairs.append((got["s"], client))
        return got["s"], client
    yield make
    for s, c in pairs:
        s.close()
        c.close()


def test_receive_into_fills_the_view_and_gives_the_permit_back(tls_pair):
    server, client = tls_pair()
    turns = Turnstile(permits=1)
    data = os.urandom(300_000)               # many TLS records
    threading.Thread(target=client.sendall, args=(data,), daemon=True).start()
    view = memoryview(bytearray(len(data)))
    receive_into(server, view, turns)
    assert view.tobytes() == data
    assert turns.enter()                     # free again


def test_receive_into_raises_when_the_peer_closes_short(tls_pair):
    server, client = tls_pair()
    turns = Turnstile(permits=1)
    client.sendall(b"x" * 1000)
    client.close()
    with pytest.raises((ConnectionError, OSError)):
        receive_into(server, memoryview(bytearray(5000)), turns)
    assert turns.enter()                     # the permit came back on the error


def _drained(sock: ssl.SSLSocket) -> bool:
    """Everything the peer sent so far has been read."""
    return sock.pending() == 0 and turnstile._queued(sock) == 0


def test_a_receive_stalled_on_its_client_holds_up_another_only_until_stall_s(tls_pair,
                                                                             monkeypatch):
    monkeypatch.setattr(turnstile, "TURN_S", 60.0)    # no turns ended by time: only a stall
    (slow_server, slow_client), (fast_server, fast_client) = tls_pair(), tls_pair()
    turns = Turnstile(permits=1, stall_s=0.05)
    slow_view = memoryview(bytearray(200_000))
    slow_client.sendall(b"s" * 50_000)       # a quarter, then a pause
    done = threading.Event()

    def slow() -> None:
        receive_into(slow_server, slow_view, turns)
        done.set()
    threading.Thread(target=slow, daemon=True).start()
    assert wait_until(lambda: turns._held and _drained(slow_server))
    time.sleep(0.2)                          # waiting in recv, holding the permit
    fast_client.sendall(b"f" * 100_000)
    fast_view = memoryview(bytearray(100_000))
    fast = threading.Thread(target=receive_into, args=(fast_server, fast_view, turns),
                            daemon=True)
    fast.start()
    fast.join(10)                            # not held up until the slow one ends
    assert fast_view.tobytes() == b"f" * 100_000 and not done.is_set()
    assert turns.revoked <= 1                # taken over (or given up, had it not waited)
    slow_client.sendall(b"s" * 150_000)      # the slow one finishes, permit or not
    assert done.wait(20)
    assert slow_view.tobytes() == b"s" * 200_000


def test_a_holder_with_others_waiting_goes_to_the_back_after_its_turn(tls_pair, monkeypatch):
    monkeypatch.setattr(turnstile, "TURN_S", 0.0)     # a turn is one record
    server, client = tls_pair()
    turns = Turnstile(permits=1, stall_s=60)
    view = memoryview(bytearray(100_000))
    order: list[str] = []

    def receive() -> None:
        receive_into(server, view, turns)
        order.append("receiver done")
    client.sendall(b"r" * 50_000)
    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    assert wait_until(lambda: turns._held and _drained(server))   # waits in recv, holding
    threads = _queue_up(turns, ["other"], order)
    client.sendall(b"r" * 50_000)            # its next record ends its turn
    receiver.join(20)
    threads[0].join(20)
    assert order == ["other", "receiver done"]
    assert view.tobytes() == b"r" * 100_000



def test_a_grant_is_revoked_only_after_stall_s_of_someone_waiting():
    turns = Turnstile(permits=1, stall_s=0.2)
    grant = turns.enter()
    time.sleep(0.3)                          # held long, but nobody waited
    order: list[str] = []
    threads = _queue_up(turns, ["w"], order)
    turns.leave(grant)                       # soon after the line formed
    threads[0].join(10)
    assert order == ["w"] and turns.revoked == 0 and turns.handoffs == 1


def test_a_client_that_stalls_again_and_again_costs_the_others_one_stall(tls_pair):
    """Each of its slots: half, a pause, the other half. The first pause costs the
    session writing beside it one `stall_s` (a revocation); from then on its receives
    are careful and wait for its records without a permit: no more revocations."""
    (slow_server, slow_client), (fast_server, fast_client) = tls_pair(), tls_pair()
    turns = Turnstile(permits=1, stall_s=0.05)
    slots, slot = 4, 2000
    slow_view = memoryview(bytearray(slots * slot))
    stop = threading.Event()
    result: dict = {}

    def stalling_client() -> None:
        for _ in range(slots):
            slow_client.sendall(b"s" * (slot // 2))
            time.sleep(0.3)
            slow_client.sendall(b"s" * (slot // 2))

    def slow() -> None:                      # slot by slot, as a session's handler does
        careful = False
        for pos in range(0, len(slow_view), slot):
            careful = receive_into(slow_server, slow_view[pos:pos + slot], turns, careful)
        result["careful"] = careful

    def fast() -> None:                      # writes flat out beside it
        rounds = 0
        while not stop.is_set():
            fast_client.sendall(b"f" * 100_000)
            view = memoryview(bytearray(100_000))
            receive_into(fast_server, view, turns)
            assert view.tobytes() == b"f" * 100_000
            rounds += 1
        result["rounds"] = rounds
    writer = threading.Thread(target=fast, daemon=True)
    writer.start()
    receiver = threading.Thread(target=slow, daemon=True)
    receiver.start()
    threading.Thread(target=stalling_client, daemon=True).start()
    receiver.join(30)
    stop.set()
    writer.join(30)
    assert turns.revoked == 1                # the first pause only
    assert slow_view.tobytes() == b"s" * (slots * slot) and result["careful"]
    assert result.get("rounds", 0) > 0


def test_a_careful_receive_whose_client_closes_says_so_at_once(tls_pair):
    server, client = tls_pair()
    turns = Turnstile(permits=1)
    client.sendall(b"x" * 100)               # less than a record's worth of the 5000
    client.close()
    start = time.monotonic()
    with pytest.raises((ConnectionError, OSError)) as caught:
        receive_into(server, memoryview(bytearray(5000)), turns, careful=True)
    assert time.monotonic() - start < 10     # not the socket's 20 s timeout
    assert not isinstance(caught.value, TimeoutError)
    assert turns.enter()                     # the permit came back
