"""What if this trace ran on a remote device? A prediction from the recorded calls.

The model follows what `harp.client.RemoteDevice` does on the wire:

- an asynchronous call costs the client what it cost when recorded, and its
  record (plus an inline payload, a module image) joins a batch; a batch is
  sent when it holds `wire.BATCH_CALLS` records or at the next sync call, and
  costs link bandwidth only;
- a write over `wire.INLINE_LIMIT` sends the batch and then its payload at
  once, at the link's bandwidth;
- a sync call sends the batch, waits for the server (one round trip), for the
  device to finish the work it depends on, and for its reply's payload;
- the device runs each stream's work in order, as soon as it has arrived,
  taking the time `timeline.py` estimates it took when recorded;
- `timing="original"` keeps the time the program spent between calls
  (`"asap"` drops it).

Each call's extra time against the recording is attributed to round trips,
transfers, or waiting for the device, which is what `blame` lists.
"""
from __future__ import annotations

import re
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable

from harp import wire
from harp.device import Device
from harp.units import format_size

from . import format as fmt
from .reader import Call
from .replay import describe
from .timeline import Timeline, estimate

#: Bytes of one call record in a batch (msgpack, a launch with a few arguments).
RECORD_BYTES = 48
#: Bytes of a sync call's reply frame, before any payload.
REPLY_BYTES = 32
#: Payload the client queues before `write` waits for the link (wire: 32 frames of 1 MiB).
SEND_QUEUE_BYTES = 32 * wire.CHUNK_SIZE


@dataclass(frozen=True)
class Link:
    """A network link: round-trip time (s) and bandwidth each way (bytes/s)."""
    rtt: float
    up: float
    down: float

    def describe(self) -> str:
        up = f"{self.up * 8 / 1e9:.2f} Gbit/s"
        if abs(self.up - self.down) > 1e-6 * self.up:
            up += f" up, {self.down * 8 / 1e9:.2f} Gbit/s down"
        return f"rtt {self.rtt * 1e6:.0f} µs, {up}"


_DURATION = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "": 1.0}
_PREFIX = {"": 1, "k": 1e3, "K": 1e3, "m": 1e6, "M": 1e6, "g": 1e9, "G": 1e9, "t": 1e12,
           "T": 1e12}


def parse_duration(text: str) -> float:
    """Seconds from "200us", "0.5ms", "1s", "150ns". The unit is required: a bare "200"
    could mean microseconds as well as seconds, and the two differ a millionfold."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ns|us|µs|μs|ms|s|)\s*",
                     str(text))
    if not m:
        raise ValueError(f"not a duration: {text!r} (examples: 200us, 0.5ms, 2s)")
    if not m.group(2):
        raise ValueError(f"a duration needs its unit: {text!r} is ambiguous (write {text}us, "
                         f"{text}ms or {text}s)")
    return float(m.group(1)) * _DURATION[m.group(2)]


def parse_bandwidth(text: str) -> float:
    """Bytes per second from "10Gbit", "25 Gbit/s", "1.2GB/s", "800MiB/s", "100Mbps"."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMgGtT]?)(i?)"
                     r"(bit|bps|b|B)?(?:/s|ps)?\s*", str(text))
    if not m or not m.group(4):
        raise ValueError(f"not a bandwidth: {text!r} (examples: 10Gbit, 1.2GB/s, 800MiB/s)")
    value, prefix, binary, unit = float(m.group(1)), m.group(2), m.group(3), m.group(4)
    scale = (1 << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[prefix.lower()]) if binary \
        else _PREFIX[prefix]
    bits = unit in ("bit", "bps", "b")
    return value * scale / (8 if bits else 1)


def measure_link(device: Device, *, rounds: int = 30, nbytes: int = 16 << 20) -> Link:
    """Measure the round trip (a `mem_info` call) and the bandwidth each way (a bulk write and
    a bulk read, less one round trip) of a device, typically a remote one."""
    for _ in range(3):
        device.mem_info()
    samples = []
    for _ in range(rounds):
        t = time.perf_counter()
        device.mem_info()
        samples.append(time.perf_counter() - t)
    rtt = statistics.median(samples)
    buf = device.alloc(nbytes)
    data = bytes(nbytes)
    up, down = [], []
    try:
        for _ in range(3):
            t = time.perf_counter()
            device.write(buf, 0, data)
            device.synchronize()
            up.append(nbytes / max(time.perf_counter() - t - rtt, 1e-9))
            t = time.perf_counter()
            device.read(buf, 0, nbytes)
            down.append(nbytes / max(time.perf_counter() - t - rtt, 1e-9))
    finally:
        device.free(buf)
        device.synchronize()
    return Link(rtt, statistics.median(up), statistics.median(down))


@dataclass
class _Blame:
    call: Call
    predicted: float = 0.0
    round_trip: float = 0.0
    transfer: float = 0.0
    device: float = 0.0
    transfer_bytes: int = 0
    link_busy: float = 0.0

    @property
    def added(self) -> float:
        return self.predicted - self.call.duration_ns


class _Sim:
    def __init__(self, tl: Timeline, link: Link) -> None:
        self.tl = tl
        self.rtt = link.rtt * 1e9
        self.up_ns = 1e9 / link.up        # ns per byte
        self.down_ns = 1e9 / link.down
        self.t = 0.0
        self.up_free = 0.0
        self.down_free = 0.0
        self.batch: list[Call] = []
        self.batch_bytes = 0
        self.ready: dict[int, float] = defaultdict(float)
        self.event_done: dict[int, float] = {}
        self.blame: list[_Blame] = []
        # the fastest sync call of the recording: a sync's fixed cost, which the measured
        # round trip already includes
        self.sync_base = min((p.overhead_ns for p in tl.syncs), default=0.0)

    def dur(self, call: Call) -> float:
        dop = self.tl.by_seq.get(call.seq)
        return dop.duration_ns if dop is not None else 0.0

    def send(self, nbytes: int, at: float) -> float:
        """Put `nbytes` on the uplink no earlier than `at`; when they reach the server."""
        start = max(at, self.up_free)
        self.up_free = start + nbytes * self.up_ns
        return self.up_free + self.rtt / 2

    def execute(self, calls: list[Call], arrival: float) -> None:
        for c in calls:
            dop = self.tl.by_seq.get(c.seq)
            if dop is None:
                continue
            start = max(arrival, self.ready[dop.stream])
            self.ready[dop.stream] = start + dop.duration_ns
            if c.op == fmt.RECORD and isinstance(c["event"], int):
                self.event_done[c["event"]] = self.ready[dop.stream]

    def flush(self, extra: int = 0) -> float:
        arrival = self.send(self.batch_bytes + extra, self.t)
        self.execute(self.batch, arrival)
        self.batch, self.batch_bytes = [], 0
        return arrival

    def async_call(self, c: Call) -> None:
        b = _Blame(c)
        self.t += c.duration_ns
        nbytes = c.get("nbytes")
        if c.op == fmt.WRITE and c.error is None and isinstance(nbytes, int) \
                and nbytes > wire.INLINE_LIMIT:
            self.batch.append(c)
            self.flush(RECORD_BYTES + nbytes)
            waited = max(0.0, self.up_free - SEND_QUEUE_BYTES * self.up_ns - self.t)
            self.t += waited
            b.transfer = waited
        else:
            size = RECORD_BYTES
            if c.op == fmt.WRITE and isinstance(nbytes, int):
                size += nbytes
            elif c.op == fmt.LOAD_MODULE:
                size += 4096        # the image; its size is in the blob, not worth reading here
            self.batch.append(c)
            self.batch_bytes += size
            if len(self.batch) >= wire.BATCH_CALLS:
                self.flush()
        b.predicted = c.duration_ns + b.transfer
        self.blame.append(b)

    def sync_call(self, c: Call) -> None:
        b = _Blame(c)
        start = self.t
        b.link_busy = max(0.0, self.up_free - self.t)     # earlier bulk data still going out
        sent_bytes = self.batch_bytes + RECORD_BYTES
        arrival = self.flush(RECORD_BYTES)
        done = arrival
        reply = REPLY_BYTES
        op = c.op
        if op == fmt.READ:
            dop = self.tl.by_seq.get(c.seq)
            stream = dop.stream if dop is not None else 0
            done = max(arrival, self.ready[stream]) + self.dur(c)
            self.ready[stream] = done
            nbytes = c.get("nbytes")
            reply += nbytes if isinstance(nbytes, int) and c.error is None else 0
        elif op == fmt.SYNCHRONIZE and isinstance(c["stream"], int):
            done = max(arrival, self.ready[c["stream"]])
        elif op in (fmt.SYNCHRONIZE, fmt.CLOSE):
            done = max([arrival, *self.ready.values()])
        elif op == fmt.ELAPSED:
            done = max([arrival] + [self.event_done.get(e, 0.0) for e in (c["start"], c["end"])
                                    if isinstance(e, int)])
        point = self.tl.sync_by_seq.get(c.seq)
        if point is not None:
            # what the call cost beyond waiting for the device when recorded (draining
            # threads, freeing memory) happens on the server now, after the wait
            done += max(0.0, point.overhead_ns - self.sync_base)
        send_start = max(done, self.down_free)
        self.down_free = send_start + reply * self.down_ns
        self.t = self.down_free + self.rtt / 2
        b.predicted = self.t - start
        b.round_trip = self.rtt
        b.device = done - arrival
        b.link_busy = min(b.link_busy, max(0.0, b.predicted - b.round_trip - b.device))
        b.transfer = max(0.0, b.predicted - b.round_trip - b.device - b.link_busy)
        b.transfer_bytes = sent_bytes + reply
        self.blame.append(b)


def whatif(calls: Iterable[Call] | Timeline, link: Link, *, timing: str = "original",
           top: int = 10) -> dict[str, Any]:
    """Predict the run time of the recorded calls on a remote device behind `link`."""
    if timing not in ("asap", "original"):
        raise ValueError(f"timing is 'asap' or 'original', got {timing!r}")
    tl = calls if isinstance(calls, Timeline) else estimate(calls)
    sim = _Sim(tl, link)
    prev_t1 = None
    gaps = 0.0
    for c in tl.calls:
        if timing == "original" and prev_t1 is not None:
            gap = max(0, c.t0 - prev_t1)
            sim.t += gap
            gaps += gap
        prev_t1 = c.t1
        if c.sync:
            sim.sync_call(c)
        else:
            sim.async_call(c)
    recorded = tl.span_ns if timing == "original" else sum(c.duration_ns for c in tl.calls)
    predicted = sim.t
    by_api: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    for b in sim.blame:
        row = by_api[b.call.api]
        row[0] += 1
        row[1] += b.call.duration_ns
        row[2] += b.predicted
    worst = sorted(sim.blame, key=lambda b: -b.added)[:top]
    syncs = sum(1 for c in tl.calls if c.sync)
    return {
        "link": {"rtt_us": link.rtt * 1e6, "up_bytes_per_s": link.up,
                 "down_bytes_per_s": link.down, "text": link.describe()},
        "timing": timing,
        "calls": len(tl.calls),
        "recorded_ms": recorded / 1e6,
        "predicted_ms": predicted / 1e6,
        "ratio": predicted / recorded if recorded else None,
        "breakdown_ms": {
            "program_between_calls": gaps / 1e6,
            "client_calls": sum(b.call.duration_ns for b in sim.blame if not b.call.sync) / 1e6,
            "round_trips": sum(b.round_trip for b in sim.blame) / 1e6,
            "transfers": sum(b.transfer + b.link_busy for b in sim.blame) / 1e6,
            "device_waits": sum(b.device for b in sim.blame) / 1e6,
        },
        "round_trips": syncs,
        "by_api": [{"api": api, "calls": int(n), "recorded_ms": r / 1e6, "predicted_ms": p / 1e6,
                    "added_ms": (p - r) / 1e6}
                   for api, (n, r, p) in sorted(by_api.items(), key=lambda kv: kv[1][1] -
                                                kv[1][2])],
        "blame": [{"seq": b.call.seq, "api": b.call.api, "call": describe(b.call),
                   "recorded_us": b.call.duration_ns / 1e3, "predicted_us": b.predicted / 1e3,
                   "added_us": b.added / 1e3, "why": _why(b)} for b in worst if b.added > 0],
    }


def _why(b: _Blame) -> str:
    parts = []
    if b.round_trip:
        parts.append(f"1 round trip {b.round_trip / 1e3:.0f} µs")
    if b.transfer >= 1e3:
        moved = b.transfer_bytes or b.call.get("nbytes")
        size = f" ({format_size(moved)})" if isinstance(moved, int) and moved > 4096 else ""
        parts.append(f"transfer{size} {b.transfer / 1e3:.0f} µs")
    if b.link_busy >= 1e3:
        parts.append(f"link busy with earlier bulk data {b.link_busy / 1e3:.0f} µs")
    if b.device >= 1e3:
        parts.append(f"waiting for the device {b.device / 1e3:.0f} µs")
    return " + ".join(parts) or "client time"


def render_whatif(res: dict[str, Any]) -> str:
    from harp.output import table
    import io
    out = io.StringIO()
    ratio = res["ratio"]
    print(f"what if: {res['calls']:,} calls on a remote device, {res['link']['text']} "
          f"(timing {res['timing']})", file=out)
    print(f"  recorded  {res['recorded_ms']:10.2f} ms", file=out)
    print(f"  predicted {res['predicted_ms']:10.2f} ms" +
          (f"  ({ratio:.2f}x)" if ratio else ""), file=out)
    bd = res["breakdown_ms"]
    print(f"  = program between calls {bd['program_between_calls']:.2f} ms + client calls "
          f"{bd['client_calls']:.2f} ms + {res['round_trips']} round trips "
          f"{bd['round_trips']:.2f} ms + transfers {bd['transfers']:.2f} ms + device waits "
          f"{bd['device_waits']:.2f} ms", file=out)
    print("\nby API", file=out)
    table(["api", "calls", "recorded ms", "predicted ms", "added ms"],
          [[a["api"], f"{a['calls']:,}", f"{a['recorded_ms']:.2f}", f"{a['predicted_ms']:.2f}",
            f"{a['added_ms']:+.2f}"] for a in res["by_api"]], out=out)
    if res["blame"]:
        print("\ncalls the prediction blames most", file=out)
        table(["call", "recorded µs", "predicted µs", "added µs", "why"],
              [[b["call"], f"{b['recorded_us']:.0f}", f"{b['predicted_us']:.0f}",
                f"{b['added_us']:+.0f}", b["why"]] for b in res["blame"]], out=out)
    return out.getvalue()
