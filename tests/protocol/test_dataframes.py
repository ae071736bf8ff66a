"""Frames on a data channel (`harp.dataframes`): lengths checked before reading, buffers
that grow only as bytes come, a deadline on a started frame, the peer's end told apart."""
from __future__ import annotations

import socket
import threading
import time
import tracemalloc

import pytest

from harp import wire
from harp.dataframes import HEADER, FrameChannel
from harp.errors import ProtocolError


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    b.settimeout(5)
    yield a, b
    a.close()
    b.close()


def _in_background(fn):
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("size", [0, 1, (64 << 10) - 1, 64 << 10, (3 << 20) + 5])
def test_frames_arrive_whole_and_in_order(pair, size):
    a, b = pair
    frames = [bytes([i]) * size for i in range(3)]
    sender = FrameChannel(a)
    t = _in_background(lambda: [sender.send(f) for f in frames])
    receiver = FrameChannel(b)
    assert [bytes(receiver.recv()) for _ in frames] == frames
    t.join()
    a.shutdown(socket.SHUT_WR)
    assert receiver.recv() is None                    # the peer closed between frames


def test_a_frame_over_the_limit_is_refused_before_its_bytes_are_read(pair):
    a, b = pair
    a.sendall(HEADER.pack(1001) + b"x" * 1001)
    with pytest.raises(ProtocolError, match="1001 bytes"):
        FrameChannel(b, limit=1000).recv()
    assert b.recv(10) == b"x" * 10                    # nothing of it was taken


def test_a_claimed_length_is_not_memory_until_its_bytes_come(pair):
    a, b = pair
    a.sendall(HEADER.pack(wire.MAX_FRAME) + b"y" * 10)
    a.shutdown(socket.SHUT_WR)
    tracemalloc.start()
    try:
        with pytest.raises(ConnectionError, match="middle of a frame"):
            FrameChannel(b).recv()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak                       # not the 64 MiB it claimed


def test_a_trickled_frame_ends_at_its_deadline(pair):
    a, b = pair
    stop = threading.Event()

    def trickle():
        a.sendall(HEADER.pack(100) + b"z")
        while not stop.wait(0.05):
            try:
                a.sendall(b"z")
            except OSError:
                return
    t = _in_background(trickle)
    t0 = time.monotonic()
    try:
        with pytest.raises(TimeoutError, match="not whole in time"):
            FrameChannel(b, deadline_s=0.3).recv()
    finally:
        stop.set()
        t.join()
    assert time.monotonic() - t0 < 4


def test_a_shut_down_channel_wakes_a_waiting_reader(pair):
    a, b = pair
    b.settimeout(None)                                # waiting for a frame: no timeout
    got = []
    t = _in_background(lambda: got.append(FrameChannel(b).recv()))
    time.sleep(0.2)
    assert t.is_alive()
    b.shutdown(socket.SHUT_RDWR)
    t.join(5)
    assert not t.is_alive() and got == [None]
