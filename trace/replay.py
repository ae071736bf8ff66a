"""Replay: re-execute a recorded session on a `Device` the caller hands over.

Every recorded call is issued again, in order, so the target numbers them as
the recording did and a deferred failure names the same call. Recorded handle
ids are mapped to the handles the target returns. Writes use the recorded
payloads, or zeros of the right size when the trace has none; reads are checked
against the recorded digest whenever every byte written so far was known.
Recorded errors are expected again: the same class (or code) and, for a
deferred failure, the same failed call and sequence number.
"""
from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from harp.device import Device
from harp.errors import TransportError
from harp.types import (DEFAULT_STREAM, ArrayArg, Buffer, BufferArg, Event, Function, Module,
                        Scalar, Stream)
from harp.units import format_size

from . import format as fmt
from .reader import Call, CallError, TraceFile

#: progress(calls_done, fraction_of_file_done)
Progress = Callable[[int, float], None]


class Unrecordable:
    """Stands in for a value the recorder could not encode (only in calls that failed at
    once); passing it again makes the call fail again."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"<unrecordable {self.text}>"


@dataclass
class Mismatch:
    """A replayed call that did not do what the recording says."""
    seq: int
    api: str
    kind: str           # "digest" | "error" | "unexpected error" | "error not raised"
    call: str           # the call, described
    expected: str
    got: str

    def __str__(self) -> str:
        return f"{self.call}: {self.kind}: expected {self.expected}, got {self.got}"


@dataclass
class ReplayResult:
    calls: int = 0
    seconds: float = 0.0
    recorded_seconds: float = 0.0
    timing: str = "asap"
    payloads: bool = False
    reads: int = 0
    digests_checked: int = 0
    digests_matched: int = 0
    digests_unchecked: int = 0
    errors_expected: int = 0
    errors_reproduced: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    mismatch_count: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.mismatch_count == 0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def describe(call: Call) -> str:
    """`read #42 (4.0 MiB at offset 0, stream default)` and the like."""
    bits = []
    nbytes = call.get("nbytes")
    if call.op in (fmt.WRITE, fmt.READ, fmt.COPY, fmt.FILL, fmt.ALLOC) and isinstance(nbytes,
                                                                                     int):
        bits.append(format_size(nbytes))
        offset = call.get("offset", call.get("dst_offset"))
        if isinstance(offset, int) and call.op != fmt.ALLOC:
            bits[-1] += f" at offset {offset}"
    if call.op == fmt.LAUNCH:
        bits.append(f"function {call['function']:#x}" if isinstance(call["function"], int)
                    else "function ?")
    if call.op == fmt.FUNCTION:
        bits.append(repr(call["name"]))
    if "stream" in fmt.OPS[call.op][1]:
        stream = call["stream"]
        if call.op != fmt.SYNCHRONIZE or stream is not None:
            name = "default" if not stream else f"{stream:#x}" if isinstance(stream, int) else "?"
            bits.append(f"stream {name}")
    return f"{call.api} #{call.seq}" + (f" ({', '.join(bits)})" if bits else "")


def _unrec(value: Any) -> Any:
    if isinstance(value, dict) and fmt.UNRECORDABLE in value:
        return Unrecordable(str(value[fmt.UNRECORDABLE]))
    return value


class _Replayer:
    def __init__(self, trace: TraceFile, device: Device, check_digests: bool,
                 max_mismatches: int) -> None:
        self.trace, self.device = trace, device
        self.check = check_digests
        self.max_mismatches = max_mismatches
        self.handles: dict[int, Any] = {}
        self.unknown_writes = 0     # writes whose bytes the trace does not hold
        self._zeros = b""
        self._blobs: OrderedDict[int, bytes] = OrderedDict()
        self.result = ReplayResult(payloads=trace.payloads)
        d = device
        self.ops: dict[int, Callable[[Call], Any]] = {
            fmt.ALLOC: lambda c: self._new(c["buffer"], d.alloc(_unrec(c["nbytes"]))),
            fmt.FREE: lambda c: d.free(self.buf(c["buffer"], c["buffer_nbytes"])),
            fmt.WRITE: self.write,
            fmt.READ: self.read,
            fmt.COPY: lambda c: d.copy(self.buf(c["dst"], c["dst_nbytes"]), _unrec(c["dst_offset"]),
                                       self.buf(c["src"], c["src_nbytes"]),
                                       _unrec(c["src_offset"]), _unrec(c["nbytes"]),
                                       self.stream(c["stream"])),
            fmt.FILL: lambda c: d.fill(self.buf(c["buffer"], c["buffer_nbytes"]),
                                       _unrec(c["value"]), _unrec(c["offset"]),
                                       _unrec(c["nbytes"]), self.stream(c["stream"])),
            fmt.LOAD_MODULE: self.load_module,
            fmt.FUNCTION: lambda c: self._new(c["function"], d.function(
                self.handle(c["module"], Module, "?"), _unrec(c["name"]))),
            fmt.LAUNCH: self.launch,
            fmt.STREAM: lambda c: self._new(c["stream_id"], d.stream()),
            fmt.EVENT: lambda c: self._new(c["event"], d.event()),
            fmt.RECORD: lambda c: d.record(self.handle(c["event"], Event), self.stream(c["stream"])),
            fmt.WAIT: lambda c: d.wait(self.stream(c["stream"]), self.handle(c["event"], Event)),
            fmt.SYNCHRONIZE: lambda c: d.synchronize(self.stream(c["stream"])),
            fmt.ELAPSED: lambda c: d.elapsed(self.handle(c["start"], Event),
                                             self.handle(c["end"], Event)),
            fmt.MEM_INFO: lambda c: d.mem_info(),
        }

    # -- handles ------------------------------------------------------------------
    def _new(self, recorded_id: Any, handle: Any) -> Any:
        if isinstance(recorded_id, int):
            self.handles[recorded_id] = handle
        return handle

    def handle(self, recorded_id: Any, kind: type, *extra: Any) -> Any:
        if not isinstance(recorded_id, int):
            return _unrec(recorded_id)
        h = self.handles.get(recorded_id)
        if h is None or not isinstance(h, kind):
            return kind(recorded_id, *extra)     # a handle the session never issued: forged
        return h

    def buf(self, recorded_id: Any, nbytes: Any) -> Any:
        if not isinstance(recorded_id, int):
            return _unrec(recorded_id)
        h = self.handles.get(recorded_id)
        size = nbytes if isinstance(nbytes, int) else 0
        if not isinstance(h, Buffer):
            return Buffer(recorded_id, size)
        return h if h.nbytes == size else Buffer(h.id, size)

    def stream(self, recorded: Any) -> Any:
        if recorded is None:
            return None
        if not isinstance(recorded, int):
            return _unrec(recorded)
        if recorded == 0:
            return DEFAULT_STREAM
        return self.handle(recorded, Stream)

    def blob(self, blob_id: int) -> bytes:
        data = self._blobs.get(blob_id)
        if data is None:
            data = self.trace.blob(blob_id)
            self._blobs[blob_id] = data
            if len(self._blobs) > 8:
                self._blobs.popitem(last=False)
        return data

    def zeros(self, nbytes: int) -> memoryview:
        if len(self._zeros) < nbytes:
            self._zeros = bytes(max(nbytes, 2 * len(self._zeros)))
        return memoryview(self._zeros)[:nbytes]

    # -- calls --------------------------------------------------------------------
    def write(self, c: Call) -> None:
        blob, nbytes = c["blob"], c["nbytes"]
        if blob:
            data: Any = self.blob(blob)
        elif isinstance(nbytes, int):
            data = self.zeros(nbytes)
            if c.error is None:
                self.unknown_writes += 1
        else:
            data = Unrecordable("write data")
        self.device.write(self.buf(c["buffer"], c["buffer_nbytes"]), _unrec(c["offset"]), data,
                          self.stream(c["stream"]))

    def read(self, c: Call) -> None:
        nbytes = _unrec(c["nbytes"])
        out = self.device.read(self.buf(c["buffer"], c["buffer_nbytes"]), _unrec(c["offset"]),
                               nbytes, None, self.stream(c["stream"]))
        r = self.result
        r.reads += 1
        want = c["digest"]
        if want is None:
            return
        if not self.check or self.unknown_writes:
            r.digests_unchecked += 1
            return
        got = hashlib.blake2b(memoryview(out)[:nbytes], digest_size=16).digest()
        r.digests_checked += 1
        if got == want:
            r.digests_matched += 1
        else:
            self.mismatch(c, "digest", want.hex(), got.hex())

    def load_module(self, c: Call) -> None:
        blob = c["blob"]
        image: Any = self.blob(blob) if blob else Unrecordable("module image")
        if c["is_str"] and isinstance(image, bytes):
            image = image.decode("utf-8")
        self._new(c["module"], self.device.load_module(image, _unrec(c["format"])))

    def launch(self, c: Call) -> None:
        args = c["args"]
        if isinstance(args, list):
            args = [self.arg(a) for a in args]
        else:
            args = _unrec(args)
        grid, block = c["grid"], c["block"]
        self.device.launch(self.handle(c["function"], Function, "?"),
                           tuple(grid) if isinstance(grid, list) else _unrec(grid),
                           tuple(block) if isinstance(block, list) else _unrec(block),
                           args, _unrec(c["shared_mem"]), self.stream(c["stream"]))

    def arg(self, a: Any) -> Any:
        if not isinstance(a, list) or not a:
            return _unrec(a)
        tag = a[0]
        if tag == fmt.ARG_BUFFER:
            return BufferArg(self.buf(a[1], a[2]), a[3])
        if tag == fmt.ARG_SCALAR:
            return Scalar(a[1], a[2])
        if tag == fmt.ARG_ARRAY:
            return ArrayArg(self.buf(a[1], a[2]), a[3], tuple(a[4]), a[5],
                            tuple(a[6]) if a[6] is not None else None)
        return Unrecordable(repr(a))

    # -- checks -------------------------------------------------------------------
    def mismatch(self, c: Call, kind: str, expected: str, got: str) -> None:
        r = self.result
        r.mismatch_count += 1
        if len(r.mismatches) < self.max_mismatches:
            r.mismatches.append(Mismatch(c.seq, c.api, kind, describe(c), expected, got))

    def compare_errors(self, c: Call, got: BaseException | None) -> None:
        want: CallError | None = c.error
        if want is None and got is None:
            return
        if want is None:
            self.mismatch(c, "unexpected error", "success", _describe_exc(got))
            return
        self.result.errors_expected += 1
        if got is None:
            self.mismatch(c, "error not raised", str(want), "success")
            return
        same_kind = (want.code or want.type) == (getattr(got, "code", None) or type(got).__name__)
        same_call = want.call is None or (want.call == getattr(got, "call", None)
                                          and want.seq == getattr(got, "seq", None))
        if same_kind and same_call:
            self.result.errors_reproduced += 1
        else:
            self.mismatch(c, "error", str(want), _describe_exc(got))


def _describe_exc(exc: BaseException | None) -> str:
    if exc is None:
        return "success"
    call, seq = getattr(exc, "call", None), getattr(exc, "seq", None)
    where = f" ({call} #{seq})" if call is not None else ""
    return f"{type(exc).__name__}{where}: {getattr(exc, 'message', None) or exc}"


def replay(trace: TraceFile | str, device: Device, *, timing: str = "asap",
           check_digests: bool = True, progress: Progress | None = None,
           max_mismatches: int = 100) -> ReplayResult:
    """Issue every call of `trace` on `device` (which the caller opened and will close).

    `timing="asap"` issues calls back to back; `"original"` also waits, before each call,
    the time the recorded program spent between the previous call and this one.
    """
    if timing not in ("asap", "original"):
        raise ValueError(f"timing is 'asap' or 'original', got {timing!r}")
    own = not isinstance(trace, TraceFile)
    tf = TraceFile(trace) if own else trace
    try:
        return _replay(tf, device, timing, check_digests, progress, max_mismatches)
    finally:
        if own:
            tf.close()


def _replay(tf: TraceFile, device: Device, timing: str, check_digests: bool,
            progress: Progress | None, max_mismatches: int) -> ReplayResult:
    rp = _Replayer(tf, device, check_digests, max_mismatches)
    r = rp.result
    r.timing = timing
    original = timing == "original"
    ops = rp.ops
    clock = time.perf_counter
    debt = 0.0
    prev_t1: int | None = None
    first_t0: int | None = None
    last_t1 = 0
    last_report = clock()
    start = clock()
    for c in tf.calls():
        if first_t0 is None:
            first_t0 = c.t0
        if c.op == fmt.CLOSE:
            last_t1 = max(last_t1, c.t1)
            break
        if original and prev_t1 is not None:
            debt += max(0, c.t0 - prev_t1) / 1e9
            if debt > 0.001:
                before = clock()
                time.sleep(debt)
                debt -= clock() - before
        prev_t1 = c.t1
        last_t1 = max(last_t1, c.t1)
        got: BaseException | None = None
        try:
            ops[c.op](c)
        except TransportError:
            raise
        except Exception as exc:
            got = exc
        rp.compare_errors(c, got)
        r.calls += 1
        if progress is not None and not r.calls & 63:
            now = clock()
            if now - last_report > 0.1:
                last_report = now
                progress(r.calls, tf.position / max(tf.data_end, 1))
    r.seconds = clock() - start
    r.recorded_seconds = (last_t1 - (first_t0 or 0)) / 1e9 if first_t0 is not None else 0.0
    if progress is not None:
        progress(r.calls, 1.0)
    if r.digests_unchecked:
        r.notes.append(
            f"{r.digests_unchecked} of {r.reads} read digests not checked: the trace was recorded "
            "without write payloads, so replay wrote zeros of the recorded sizes (record with "
            "payloads=True / HARP_TRACE_PAYLOADS=1 to check them)")
    return r
