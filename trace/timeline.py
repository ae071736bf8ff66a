"""When did the device work? An estimate from the client-side times a trace holds.

A trace records when each call entered and left the `Device` interface, not
when the device ran it: an asynchronous launch returns at once, and its kernel
runs some time before the sync call that waits for it returns. This module
places every piece of device work (kernel, write, read, copy, fill) on its
stream's timeline:

1. Each op gets a *prior* duration from what the trace says about it (bytes
   moved; for catalog kernels the element count or the gemm size; a fixed
   guess for other kernels), see `prior_ns`.
2. Ops on one stream run in order, each starting when it was issued or when
   the previous op ended, whichever is later.
3. A sync call that waited for a stream ends the *window* of ops pending on
   it. If the call blocked (it took notably longer than the fastest call of
   its kind in the trace), the device was busy until the call returned, so the
   window's priors are scaled to end then; if the priors would end after the
   call returned, they are scaled down to fit. Otherwise the priors stand.

Dependencies between streams (`wait` on another stream's event) are not
modelled. The report, the Chrome export and the what-if prediction all use
this one estimate, so they agree with each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from harp import catalog

from . import format as fmt
from .reader import Call

#: Priors: fixed cost of a launch, of a kernel we know nothing about, and the rates
#: of device memory, host<->device copies and arithmetic. Only ratios matter where the
#: trace shows the device was busy; elsewhere they are the estimate.
LAUNCH_FIXED_NS = 2_000
UNKNOWN_KERNEL_NS = 20_000
COPY_FIXED_NS = 1_000
DEVICE_BYTES_PER_S = 10e9
HOST_BYTES_PER_S = 5e9
FLOPS_PER_S = 20e9
#: A sync call "blocked" when it took this much longer than the fastest of its kind.
BLOCKED_FACTOR, BLOCKED_EXTRA_NS = 1.5, 20_000


@dataclass(slots=True, eq=False)
class DeviceOp:
    """One piece of device work, placed on its stream: times in ns since the trace origin."""
    call: Call
    stream: int
    kind: str            # "kernel" | "write" | "read" | "copy" | "fill" | "marker"
    label: str
    prior: float
    issue: int
    start: float = 0.0
    end: float = 0.0
    fitted: bool = False  # True when a blocking sync call pinned the end of its window

    @property
    def duration_ns(self) -> float:
        return self.end - self.start


@dataclass(slots=True)
class SyncPoint:
    """A sync call: what it waited for and how long it blocked the client."""
    call: Call
    streams: list[int]
    waited_ops: int
    blocked: bool
    excess_ns: float      # duration beyond the fastest call of its kind
    waited_until: float | None = None   # when the device work it waited for ended

    @property
    def overhead_ns(self) -> float:
        """The part of the call's time not spent waiting for device work (its own cost)."""
        waited = 0.0 if self.waited_until is None else max(0.0, self.waited_until - self.call.t0)
        return max(0.0, self.call.duration_ns - waited)


@dataclass
class Timeline:
    calls: list[Call]
    ops: list[DeviceOp]
    syncs: list[SyncPoint]
    start_ns: int
    end_ns: int
    busy_ns: float
    idle_gaps: list[tuple[float, float]] = field(default_factory=list)
    kernel_names: dict[int, str] = field(default_factory=dict)
    by_seq: dict[int, DeviceOp] = field(default_factory=dict)
    sync_by_seq: dict[int, SyncPoint] = field(default_factory=dict)

    @property
    def span_ns(self) -> int:
        return self.end_ns - self.start_ns

    @property
    def idle_ns(self) -> float:
        return max(0.0, self.span_ns - self.busy_ns)


def _scalar(arg: object) -> object:
    if isinstance(arg, list) and len(arg) == 3 and arg[0] == fmt.ARG_SCALAR:
        return arg[1]
    return None


def kernel_prior_ns(name: str, args: list) -> float:
    """A guess at a kernel's run time from its catalog entry and arguments."""
    kernel = catalog.KERNELS.get(name)
    if kernel is None:
        return UNKNOWN_KERNEL_NS
    op = kernel.op
    if op.name == "noop":
        return LAUNCH_FIXED_NS
    values = {}
    for param, arg in zip(op.params, args or ()):
        if param.kind == "scalar":
            values[param.name] = _scalar(arg)
    size = {"float32": 4, "float64": 8, "int32": 4, "int64": 8}.get(kernel.dtype or "", 4)
    try:
        if op.name == "gemm":
            m, n, k = (int(values[x]) for x in ("m", "n", "k"))
            return LAUNCH_FIXED_NS + 2.0 * m * n * k / FLOPS_PER_S * 1e9
        n = int(values.get("n") or 0)
    except (KeyError, TypeError, ValueError):
        return UNKNOWN_KERNEL_NS
    buffers = sum(1 for p in op.params if p.kind == "buffer")
    return LAUNCH_FIXED_NS + n * size * max(buffers, 1) / DEVICE_BYTES_PER_S * 1e9


def _bytes_ns(nbytes: object, rate: float) -> float:
    return COPY_FIXED_NS + (int(nbytes) if isinstance(nbytes, int) else 0) / rate * 1e9


def _fill_bytes(call: Call) -> int:
    nbytes = call["nbytes"]
    if nbytes is None:
        total, offset = call["buffer_nbytes"], call["offset"]
        if isinstance(total, int) and isinstance(offset, int):
            return max(0, total - offset)
        return 0
    return nbytes if isinstance(nbytes, int) else 0


def _stream_id(value: object) -> int:
    return value if isinstance(value, int) else 0


class _Estimator:
    def __init__(self) -> None:
        self.ops: list[DeviceOp] = []
        self.syncs: list[SyncPoint] = []
        self.pending: dict[int, list[DeviceOp]] = {}
        self.ready: dict[int, float] = {}
        self.kernel_names: dict[int, str] = {}
        self.event_ops: dict[int, DeviceOp] = {}
        self.by_seq: dict[int, DeviceOp] = {}

    def device_op(self, call: Call) -> DeviceOp | None:
        op = call.op
        if call.error is not None:
            return None     # failed at once (or raised a deferred failure): no device work
        if op == fmt.LAUNCH:
            name = self.kernel_names.get(call["function"], f"kernel {call['function']:#x}"
                                         if isinstance(call["function"], int) else "kernel")
            return DeviceOp(call, _stream_id(call["stream"]), "kernel", name,
                            kernel_prior_ns(name, call["args"]), call.t1)
        if op == fmt.WRITE:
            return DeviceOp(call, _stream_id(call["stream"]), "write", "write H2D",
                            _bytes_ns(call["nbytes"], HOST_BYTES_PER_S), call.t1)
        if op == fmt.READ:
            return DeviceOp(call, _stream_id(call["stream"]), "read", "read D2H",
                            _bytes_ns(call["nbytes"], HOST_BYTES_PER_S), call.t0)
        if op == fmt.COPY:
            return DeviceOp(call, _stream_id(call["stream"]), "copy", "copy D2D",
                            _bytes_ns(call["nbytes"], DEVICE_BYTES_PER_S / 2), call.t1)
        if op == fmt.FILL:
            return DeviceOp(call, _stream_id(call["stream"]), "fill", "fill",
                            _bytes_ns(_fill_bytes(call), DEVICE_BYTES_PER_S), call.t1)
        if op in (fmt.RECORD, fmt.WAIT):
            return DeviceOp(call, _stream_id(call["stream"]), "marker", call.api, 0.0, call.t1)
        return None

    def run(self, calls: list[Call]) -> None:
        base = _baselines(calls)
        for call in calls:
            if call.op == fmt.FUNCTION and call.error is None:
                self.kernel_names[call["function"]] = str(call["name"])
            dop = self.device_op(call)
            if dop is not None:
                self.ops.append(dop)
                self.by_seq[call.seq] = dop
                if call.op == fmt.RECORD:
                    self.event_ops[call["event"]] = dop
                if call.op != fmt.READ:
                    self.pending.setdefault(dop.stream, []).append(dop)
            if call.sync:
                self.sync(call, dop, base)
        for stream, ops in self.pending.items():
            self.place(stream, ops, None, False)
        self.pending.clear()

    def sync(self, call: Call, own: DeviceOp | None, base: dict[int, float]) -> None:
        excess = call.duration_ns - (own.prior if own is not None else 0.0)
        blocked = excess > BLOCKED_FACTOR * base.get(call.op, 0.0) + BLOCKED_EXTRA_NS
        target = call.t1 - base.get(call.op, 0.0)
        windows: list[tuple[int, list[DeviceOp]]] = []
        op = call.op
        if op == fmt.READ:
            stream = own.stream if own is not None else _stream_id(call["stream"])
            windows.append((stream, self.pending.pop(stream, []) + ([own] if own else [])))
        elif op == fmt.SYNCHRONIZE and call["stream"] is not None:
            stream = _stream_id(call["stream"])
            windows.append((stream, self.pending.pop(stream, [])))
        elif op in (fmt.SYNCHRONIZE, fmt.CLOSE):
            windows.extend(self.pending.items())
            self.pending = {}
        elif op == fmt.ELAPSED:
            for ev in (call["start"], call["end"]):
                marker = self.event_ops.get(ev) if isinstance(ev, int) else None
                if marker is None:
                    continue
                ops = self.pending.get(marker.stream, [])
                if marker in ops:
                    cut = ops.index(marker) + 1
                    windows.append((marker.stream, ops[:cut]))
                    self.pending[marker.stream] = ops[cut:]
        waited = 0
        until = None
        for stream, ops in windows:
            waited += len(ops)
            self.place(stream, ops, target, blocked)
            if ops:
                until = max(until or 0.0, ops[-1].end)
        self.syncs.append(SyncPoint(call, [s for s, _ in windows], waited, blocked,
                                    max(0.0, excess - base.get(call.op, 0.0)), until))

    def place(self, stream: int, ops: list[DeviceOp], target: float | None,
              blocked: bool) -> None:
        if not ops:
            return
        ready = self.ready.get(stream, 0.0)
        scale = 1.0
        if target is not None and sum(o.prior for o in ops) > 0:
            natural = _end(ops, ready, 1.0)
            if natural > target or (blocked and natural < target):
                scale = _solve(ops, ready, target)
                for o in ops:
                    o.fitted = True
        end = ready
        for o in ops:
            start = o.issue if o.issue > end else end
            end = start + o.prior * scale
            o.start, o.end = start, end
        self.ready[stream] = end


def _end(ops: list[DeviceOp], ready: float, scale: float) -> float:
    end = ready
    for o in ops:
        start = o.issue if o.issue > end else end
        end = start + o.prior * scale
    return end


def _solve(ops: list[DeviceOp], ready: float, target: float) -> float:
    """The scale of the priors that makes the window end at `target` (bisection)."""
    if _end(ops, ready, 0.0) >= target:
        return 0.0
    lo, hi = 0.0, 1.0
    while _end(ops, ready, hi) < target:
        lo, hi = hi, hi * 4
        if hi > 1e12:
            return hi
    for _ in range(50):
        mid = (lo + hi) / 2
        if _end(ops, ready, mid) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-6 * hi:
            break
    return hi


def _baselines(calls: list[Call]) -> dict[int, float]:
    """Per sync op: the fastest call's time beyond its own transfer (what a sync costs idle)."""
    base: dict[int, float] = {}
    for call in calls:
        if not call.sync:
            continue
        own = _bytes_ns(call["nbytes"], HOST_BYTES_PER_S) if call.op == fmt.READ else 0.0
        excess = max(0.0, call.duration_ns - own)
        if excess < base.get(call.op, float("inf")):
            base[call.op] = excess
    return base


def _union(ops: Iterable[DeviceOp], lo: float, hi: float) -> tuple[float, list[tuple[float, float]]]:
    """Busy time within [lo, hi] and the idle gaps between busy intervals."""
    spans = sorted((max(o.start, lo), min(o.end, hi)) for o in ops if o.end > o.start)
    busy, gaps = 0.0, []
    cursor = lo
    for s, e in spans:
        if e <= cursor:
            continue
        if s > cursor:
            gaps.append((cursor, s))
            cursor = s
        busy += e - cursor
        cursor = e
    if cursor < hi:
        gaps.append((cursor, hi))
    return busy, gaps


def estimate(calls: Iterable[Call]) -> Timeline:
    """Place every recorded piece of device work on its stream (see the module docstring)."""
    calls = list(calls)
    est = _Estimator()
    est.run(calls)
    start = min((c.t0 for c in calls), default=0)
    end = max((c.t1 for c in calls), default=0)
    busy, gaps = _union(est.ops, start, end)
    return Timeline(calls=calls, ops=est.ops, syncs=est.syncs, start_ns=start, end_ns=end,
                    busy_ns=busy, idle_gaps=gaps, kernel_names=est.kernel_names,
                    by_seq=est.by_seq, sync_by_seq={p.call.seq: p for p in est.syncs})
