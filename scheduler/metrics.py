"""The scheduler's figures for Prometheus: leases and servers by state, read from the
store when scraped; attach latency and placement refusals, observed as attaches end
(`Scheduler.attach_observers`). docs/metrics.md lists every series.
"""
from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from .placement import REASONS

LEASE_STATES = ("active", "ended", "expired", "lost")
SERVER_STATES = ("up", "draining", "down")
#: Attach latency buckets, seconds: a placement is one SQLite transaction and a signature.
ATTACH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class StoreCollector:
    """Leases and pool servers by state, counted in the store at each scrape."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def collect(self) -> Iterator[Any]:
        for table, states, name, doc in (
                ("leases", LEASE_STATES, "harp_scheduler_leases", "Leases in each state"),
                ("servers", SERVER_STATES, "harp_scheduler_servers",
                 "Registered pool servers in each state")):
            found = self.store.counts(table)
            family = GaugeMetricFamily(name, doc, labels=["state"])
            for state in sorted(set(states) | set(found)):
                family.add_metric([state], found.get(state, 0))
            yield family


def register(scheduler: Any, registry: Any) -> None:
    """Put the scheduler's metrics in `registry` and start observing its attaches."""
    registry.register(StoreCollector(scheduler.store))
    latency = Histogram("harp_scheduler_attach_seconds",
                        "Time to answer an attach, by outcome (attached, refused)",
                        ["outcome"], buckets=ATTACH_BUCKETS, registry=registry)
    failures = Counter("harp_scheduler_placement_failures",
                       "Attaches refused, by reason", ["reason"], registry=registry)
    for outcome in ("attached", "refused"):
        latency.labels(outcome)
    for reason in REASONS:
        failures.labels(reason)

    def observe(seconds: float, refused: str | None) -> None:
        latency.labels("refused" if refused else "attached").observe(seconds)
        if refused:
            failures.labels(refused).inc()
    scheduler.attach_observers.append(observe)
