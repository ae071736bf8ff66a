"""The file format: what a recording writes, and how a reader treats torn and damaged files."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import harp
from harp.trace import (TraceCorruptError, TraceError, TraceIncompleteWarning, TraceRecorder,
                        TraceTruncatedWarning, open_trace)
from harp.trace import format as fmt

from .conftest import mixed_workload


def _blocks(path):
    """(offset, kind, length) of every block."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        return [item[:3] for item in fmt.scan_blocks(f, str(path), fmt.FILE_HEADER_SIZE, size,
                                                      read_kinds=frozenset())
                if not isinstance(item, fmt.Tail)]


@pytest.fixture
def recorded(tmp_path):
    """A trace of the mixed workload on local:cpu, with payloads, flushed in several blocks."""
    path = tmp_path / "mixed.harptrace"
    dev = TraceRecorder(harp.connect("local:cpu", trace=False), path, payloads=True)
    mixed_workload(dev)
    dev.close()
    return path


def test_a_recording_holds_every_call_in_order_with_header_and_end(recorded):
    with open_trace(recorded) as t:
        calls = t.read_all()
        assert t.complete and t.warnings == []
        assert t.header["format"] == "harp-trace" and t.header["version"] == [1, 0]
        assert t.header["device"]["backend"] == "cpu" and t.payloads
        assert t.end["calls"] == len(calls)
    assert [c.seq for c in calls] == list(range(1, len(calls) + 1))
    apis = {c.api for c in calls}
    assert apis == {"load_module", "function", "stream", "event", "alloc", "write", "record",
                    "wait", "launch", "copy", "fill", "read", "elapsed", "mem_info", "free",
                    "synchronize", "close"}
    assert all(c.t1 >= c.t0 >= 0 for c in calls)
    assert all(a.t0 <= b.t0 for a, b in zip(calls, calls[1:]))
    deferred = [c for c in calls if c.error is not None]
    assert len(deferred) == 1 and deferred[0].api == "synchronize"
    assert deferred[0].error.type == "InvalidHandleError"
    assert deferred[0].error.call == "free"
    frees = [c for c in calls if c.api == "free"]
    assert deferred[0].error.seq == frees[1].seq     # the second free of the same buffer
    kinds = [k for _, k, _ in _blocks(recorded)]
    assert kinds[0] == fmt.HEADER and kinds[-1] == fmt.END
    assert kinds.count(fmt.CALLS) >= 5 and fmt.BLOB in kinds   # a block per sync point


def test_a_truncated_file_opens_with_a_warning_and_keeps_every_complete_block(recorded, tmp_path):
    with open_trace(recorded) as t:
        full = t.read_all()
    last_calls = [b for b in _blocks(recorded) if b[1] == fmt.CALLS][-1]
    data = recorded.read_bytes()
    exact = tmp_path / "exact.harptrace"             # cut at a block boundary: complete blocks
    exact.write_bytes(data[:last_calls[0]])
    with pytest.warns(TraceIncompleteWarning):
        t = open_trace(exact)
    with t:
        n_before = len(t.read_all())
    assert 0 < n_before < len(full)
    # a writer that died inside the last calls block: in its body, and in its header
    for cut in (last_calls[0] + fmt.BLOCK_HEADER_SIZE + last_calls[2] // 2, last_calls[0] + 7):
        torn = tmp_path / f"torn{cut}.harptrace"
        torn.write_bytes(data[:cut])
        with pytest.warns(TraceTruncatedWarning,
                          match=f"truncated at byte offset {last_calls[0]}"):
            t = open_trace(torn)
        with t:
            got = t.read_all()
            assert not t.complete and t.end is None and t.warnings
        assert [c.seq for c in got] == [c.seq for c in full[:n_before]]


def test_a_zero_filled_tail_is_a_truncation_not_corruption(recorded, tmp_path):
    torn = tmp_path / "zeros.harptrace"
    torn.write_bytes(recorded.read_bytes() + bytes(100))
    with pytest.warns(TraceTruncatedWarning, match="zero bytes"):
        with open_trace(torn) as t:
            assert len(t.read_all()) == t.end["calls"]


def test_a_corrupt_byte_in_the_middle_is_a_clear_error_naming_the_offset(recorded, tmp_path):
    blocks = _blocks(recorded)
    calls_blocks = [b for b in blocks if b[1] == fmt.CALLS]
    offset, _, length = calls_blocks[len(calls_blocks) // 2]
    data = bytearray(recorded.read_bytes())
    data[offset + fmt.BLOCK_HEADER_SIZE + length // 2] ^= 0x40       # one bit, inside the body
    bad = tmp_path / "bad.harptrace"
    bad.write_bytes(bytes(data))
    with pytest.raises(TraceCorruptError, match=f"at byte offset {offset}: calls block body "
                                                "checksum mismatch") as info:
        with open_trace(bad) as t:
            t.read_all()
    assert info.value.offset == offset and isinstance(info.value, harp.HarpError)

    data = bytearray(recorded.read_bytes())
    offset = calls_blocks[1][0]
    data[offset + 4] ^= 0x01                                         # the length field
    bad.write_bytes(bytes(data))
    with pytest.raises(TraceCorruptError, match=f"at byte offset {offset}: block header "
                                                "checksum mismatch"):
        open_trace(bad)


def test_not_a_trace_and_an_unknown_version_are_clear_errors(recorded, tmp_path):
    other = tmp_path / "other.harptrace"
    other.write_bytes(b"hello, this is not a trace at all")
    with pytest.raises(TraceError, match="is not a HARP trace"):
        open_trace(other)
    data = bytearray(recorded.read_bytes())
    data[8:10] = (2).to_bytes(2, "little")
    other.write_bytes(bytes(data))
    with pytest.raises(TraceError, match="version 2.0 trace; this HARP reads version 1"):
        open_trace(other)
    with pytest.raises(TraceError, match="cannot open trace"):
        open_trace(tmp_path / "missing.harptrace")


def test_a_process_that_dies_keeps_every_call_up_to_its_last_sync_point(tmp_path):
    path = tmp_path / "crash.harptrace"
    code = textwrap.dedent(f"""
        import os, numpy as np, harp
        dev = harp.connect("local:cpu", trace={str(path)!r})
        lib = dev.load_module(harp.CATALOG_IMAGE, "catalog")
        b = dev.alloc(64)
        dev.write(b, 0, np.arange(16, dtype=np.float32))
        dev.read(b, 0, 64)
        os._exit(3)          # no close, no atexit: as if killed
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 3, proc.stderr
    with pytest.warns(TraceIncompleteWarning, match="no end block"):
        t = open_trace(path)
    with t:
        assert [c.api for c in t.calls()] == ["load_module", "alloc", "write", "read"]


def test_an_abandoned_recorder_writes_its_calls_at_exit(tmp_path):
    path = tmp_path / "exit.harptrace"
    code = (f"import harp\ndev = harp.connect('local:cpu', trace={str(path)!r})\n"
            "dev.alloc(64)\ndev.alloc(128)\n")          # no sync call, no close
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    with open_trace(path) as t:
        assert [c["nbytes"] for c in t.calls()] == [64, 128]
        assert t.end["clean"] is False


def test_unknown_block_kinds_from_a_later_minor_version_are_skipped(recorded, tmp_path):
    data = recorded.read_bytes()
    first_calls = [b for b in _blocks(recorded) if b[1] == fmt.CALLS][0][0]
    newer = tmp_path / "newer.harptrace"
    newer.write_bytes(data[:first_calls] + fmt.block(9, b"something new") + data[first_calls:])
    with open_trace(newer) as t, open_trace(recorded) as old:
        assert len(t.read_all()) == len(old.read_all())
