"""Replay: a recorded session re-executed on local and remote devices reads the same bytes."""
from __future__ import annotations

import time

import numpy as np
import pytest

import harp
from harp.trace import TraceRecorder, open_trace
from harp.trace import format as fmt
from harp.trace.replay import replay

from .conftest import mixed_workload, read_digests


@pytest.fixture
def recorded(device, tmp_path):
    """The mixed workload recorded with payloads on each kind of device."""
    if device.info.backend != "cpu":
        pytest.skip("replays go to cpu devices here: float results may differ by a last bit "
                    "across backends (a GPU fuses multiply-adds), so digests would too")
    path = tmp_path / "rec.harptrace"
    rec = TraceRecorder(device, path, payloads=True)
    mixed_workload(rec)
    rec.close()
    return path


@pytest.mark.parametrize("target", ["local", "remote"])
def test_record_then_replay_reads_identical_digests(recorded, target, pool_server, tmp_path):
    fresh = harp.connect("local:cpu") if target == "local" else pool_server.connect()
    again = tmp_path / "again.harptrace"
    dev = TraceRecorder(fresh, again, payloads=True)     # record the replay too
    try:
        result = replay(recorded, dev)
    finally:
        dev.close()
    assert result.ok, result.mismatches
    assert result.reads == 3 and result.digests_checked == 3 and result.digests_matched == 3
    assert result.errors_expected == result.errors_reproduced == 1   # the double free, same seq
    assert read_digests(again) == read_digests(recorded)             # byte-identical reads
    with open_trace(recorded) as a, open_trace(again) as b:
        assert [(c.seq, c.api) for c in a.calls()] == [(c.seq, c.api) for c in b.calls()]


def test_without_payloads_replay_writes_zeros_and_says_digests_were_not_checked(tmp_path):
    path = tmp_path / "nopay.harptrace"
    with harp.connect("local:cpu", trace=str(path)) as dev:
        buf = dev.alloc(64)
        dev.write(buf, 0, np.arange(16, dtype=np.float32))
        dev.read(buf, 0, 64)
    with harp.connect("local:cpu") as dev:
        result = replay(path, dev)
    assert result.ok and result.digests_checked == 0 and result.digests_unchecked == 1
    assert "recorded without write payloads" in result.notes[0]


def _tamper_read_digest(src, dst):
    """Copy a trace, changing the digest of its first read (blocks re-encoded, CRCs right)."""
    enc = fmt.Encoder()
    data = src.read_bytes()
    out = bytearray(data[:fmt.FILE_HEADER_SIZE])
    done = False
    with open(src, "rb") as f:
        for item in fmt.scan_blocks(f, str(src), fmt.FILE_HEADER_SIZE, len(data),
                                    read_kinds=frozenset((fmt.CALLS,))):
            if isinstance(item, fmt.Tail):
                break
            offset, kind, codec, length, body = item
            raw = data[offset:offset + fmt.BLOCK_HEADER_SIZE + length]
            if kind == fmt.CALLS and not done:
                flat = fmt.decode_body(codec, body, str(src), offset)
                i = 0
                while i < len(flat):
                    op = flat[i]
                    if op == fmt.READ:
                        flat[i + fmt.FIELDS_AT + 5] = b"\0" * 16
                        done = True
                        break
                    i += fmt.FIELDS_AT + len(fmt.OPS[op][1])
                raw = enc.packed(fmt.CALLS, flat)
            out += raw
    dst.write_bytes(bytes(out))


def test_a_read_that_differs_is_reported_with_its_call(tmp_path):
    path = tmp_path / "rec.harptrace"
    with harp.connect("local:cpu", trace=str(path), trace_payloads=True) as dev:
        mixed_workload(dev)
    bad = tmp_path / "tampered.harptrace"
    _tamper_read_digest(path, bad)
    with harp.connect("local:cpu") as dev:
        result = replay(bad, dev)
    assert not result.ok and result.mismatch_count == 1
    m = result.mismatches[0]
    assert m.kind == "digest" and m.api == "read" and m.expected == "00" * 16
    assert str(m).startswith(f"read #{m.seq} (391 KiB at offset 0, stream default)")


def test_original_timing_keeps_the_programs_pauses(tmp_path):
    path = tmp_path / "slow.harptrace"
    with harp.connect("local:cpu", trace=str(path)) as dev:
        buf = dev.alloc(16)
        for _ in range(4):
            time.sleep(0.08)
            dev.fill(buf, 1)
            dev.synchronize()
    with harp.connect("local:cpu") as dev:
        asap = replay(path, dev, timing="asap")
    with harp.connect("local:cpu") as dev:
        original = replay(path, dev, timing="original")
    assert asap.ok and original.ok
    assert original.recorded_seconds >= 0.24
    assert original.seconds >= 0.85 * original.recorded_seconds
    assert asap.seconds < 0.5 * asap.recorded_seconds
