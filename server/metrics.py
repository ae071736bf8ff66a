"""A pool server's figures for Prometheus, read from its own books when scraped.

Nothing here runs on a session's path: the collector reads, at scrape time, what
the server keeps anyway (docs/metrics.md lists every series):

- per device: capacity and use from the memory `Ledger`, open sessions, and the
  backend's live readings (`Backend.telemetry`: NVML on a GPU);
- per open session, labelled by session, lease, identity and device: its host's
  counts (`hosts.SessionHost.counts`: calls, payload bytes, device time, failures by
  code, kept by its worker in shared memory), its memory from the ledger, and the
  bytes the server process relayed for it. These series go when the session ends;
- per device, the same counts summed over every session it served, ended ones
  included (`PoolServer.totals`), so rates over many short sessions add up.
"""
from __future__ import annotations

from typing import Any, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .counters import Counts

SESSION_LABELS = ["session", "lease", "identity", "device"]
#: `Backend.telemetry` keys and the gauges they become.
READINGS = {
    "utilization": ("harp_device_utilization_ratio",
                    "Fraction of the last sample period the device was busy (0-1), as its "
                    "driver reports it"),
    "temperature_celsius": ("harp_device_temperature_celsius", "Device temperature"),
    "power_watts": ("harp_device_power_watts", "Device power draw"),
}


class PoolCollector:
    """A `prometheus_client` collector over one `PoolServer`."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self._facts: dict[int, Any] = {}     # each device's DeviceInfo, fixed for its lifetime

    def collect(self) -> Iterator[Any]:
        server = self.server
        records, retired, opened = server.totals()
        yield _gauge("harp_server_info", "The pool server, its backend and isolation (always 1)",
                     ["server", "backend", "isolation"],
                     [([server.name, server.backend.name, server.isolation], 1)])
        yield _counter("harp_server_sessions_refused",
                       "Sessions refused at the handshake, by error code", ["code"],
                       [([code], n) for code, n in sorted(server.refused.items())])
        counts = {r.id: server.session_counts(r) for r in records}
        yield from self._devices(records, counts, retired, opened)
        yield from self._sessions(records, counts)

    def _devices(self, records: list, counts: dict[str, Counts], retired: dict[int, Counts],
                 opened: dict[int, int]) -> Iterator[Any]:
        server = self.server
        devices = sorted(server.arbiters)
        totals = {d: retired.get(d, Counts()) for d in devices}
        live = {d: 0 for d in devices}
        for record in records:
            if record.device in totals:
                totals[record.device] += counts[record.id]
                live[record.device] += 1
        info, readings = [], {key: [] for key in READINGS}
        for d in devices:
            facts = self._facts.get(d)
            if facts is None:
                facts = self._facts[d] = server.backend.describe(d)
            info.append(([str(d), facts.kind, facts.name, facts.backend], 1))
            for key, value in server.backend.telemetry(d).items():
                if key in readings:
                    readings[key].append(([str(d)], value))
        yield _gauge("harp_device_info", "A device this server serves (always 1)",
                     ["device", "kind", "name", "backend"], info)
        yield _gauge("harp_device_memory_total_bytes", "Device memory sessions may reserve",
                     ["device"], [([str(d)], server.ledger.capacity(d)) for d in devices])
        yield _gauge("harp_device_memory_used_bytes", "Device memory reserved by open sessions",
                     ["device"], [([str(d)], server.ledger.used(d)) for d in devices])
        yield _gauge("harp_device_sessions", "Open sessions on the device", ["device"],
                     [([str(d)], live[d]) for d in devices])
        yield _counter("harp_device_sessions_opened", "Sessions opened on the device",
                       ["device"], [([str(d)], opened.get(d, 0)) for d in devices])
        for key, (name, doc) in READINGS.items():
            yield _gauge(name, doc, ["device"], readings[key])
        yield from _count_families("harp_device", "the device's sessions, ended ones included",
                                   [([str(d)], totals[d]) for d in devices], ["device"],
                                   "busy_seconds")

    def _sessions(self, records: list, counts: dict[str, Counts]) -> Iterator[Any]:
        server = self.server
        rows, memory, share, started, received, sent = [], [], [], [], [], []
        for r in records:
            labels = [r.id, r.lease_id, r.identity.name, str(r.device)]
            host = r.host
            rows.append((labels, counts[r.id]))
            memory.append((labels, server.ledger.session_used(r.id)))
            share.append((labels, r.share))
            started.append((labels, r.admitted))
            received.append((labels, host.bytes_in if host is not None else 0))
            sent.append((labels, host.bytes_out if host is not None else 0))
        yield from _count_families("harp_session", "the session", rows, SESSION_LABELS,
                                   "device_seconds")
        yield _gauge("harp_session_memory_used_bytes", "Device memory the session has reserved",
                     SESSION_LABELS, memory)
        yield _gauge("harp_session_share_ratio", "The session's compute share (0-1)",
                     SESSION_LABELS, share)
        yield _gauge("harp_session_start_time_seconds", "When the session opened (Unix time)",
                     SESSION_LABELS, started)
        yield _counter("harp_session_received_bytes",
                       "Bytes the server process received for the session (frames and data "
                       "channel; not a same-host window's payload)", SESSION_LABELS, received)
        yield _counter("harp_session_sent_bytes",
                       "Bytes the server process sent for the session (frames and data "
                       "channel; not a same-host window's payload)", SESSION_LABELS, sent)


def _count_families(prefix: str, whose: str, rows: list[tuple[list[str], Counts]],
                    labels: list[str], time_name: str) -> Iterator[Any]:
    """Calls, payload bytes, device time and failures by code, for rows of (labels, Counts)."""
    yield _counter(f"{prefix}_calls", f"Device calls run by {whose}", labels,
                   [(lv, c.calls) for lv, c in rows])
    yield _counter(f"{prefix}_write_bytes", f"Bytes written to device memory by {whose}",
                   labels, [(lv, c.write_bytes) for lv, c in rows])
    yield _counter(f"{prefix}_read_bytes", f"Bytes read from device memory by {whose}",
                   labels, [(lv, c.read_bytes) for lv, c in rows])
    yield _counter(f"{prefix}_{time_name}", f"Kernel time on the device of {whose}",
                   labels, [(lv, c.device_ns / 1e9) for lv, c in rows])
    yield _counter(f"{prefix}_errors", f"Failures reported to {whose}, by error code",
                   [*labels, "code"], [([*lv, code], n) for lv, c in rows
                                       for code, n in sorted(c.errors.items())])


def _gauge(name: str, doc: str, labels: list[str], samples: list) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for values, value in samples:
        family.add_metric(values, value)
    return family


def _counter(name: str, doc: str, labels: list[str], samples: list) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labels)
    for values, value in samples:
        family.add_metric(values, value)
    return family
