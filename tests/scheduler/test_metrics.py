"""Prometheus metrics of a real pool: a scheduler and a pool server (process isolation),
both started with `--metrics-listen 127.0.0.1:0`, scraped over HTTPS with a monitor
certificate and parsed with prometheus_client's own parser.

- A session does a known amount of work (writes and reads of known sizes, launches,
  one provoked INVALID_HANDLE) while another session keeps the server busy; the
  scraped figures match it exactly (calls, payload bytes, errors, memory) and device
  time is bounded by the session's wall time. Its series go when it ends; the device's
  totals keep what it did.
- The scheduler counts attaches (latency histogram by outcome), refused ones by
  placement reason, and leases and servers by state.
- The protection rule: no client certificate, no scrape; a client certificate, 403;
  monitor and admin certificates, 200; a monitor certificate opens no session and
  attaches nothing; plain text only on loopback.
- The Grafana dashboard in deploy/ is JSON and names only metrics a live scrape has.
"""
from __future__ import annotations

import json
import re
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import harp
from harp.client import connect_lease

from .conftest import HARP, Cluster, wait_until

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "harp-dashboard.json"


def _metrics_url(proc) -> str:
    """The metrics address a service printed after its listening line(s)."""
    for _ in range(8):
        line = proc.stdout.readline()
        if "HARP metrics on" in line:
            return line.split("HARP metrics on ")[1].split()[0]
    raise AssertionError("the service did not say where its metrics are")


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """One scheduler and one pool server (256 MiB cpu device), each with a metrics
    endpoint, and a background session that keeps the server busy the whole time."""
    c = Cluster(tmp_path_factory.mktemp("metrics"))
    try:
        c.start_scheduler(extra=["--metrics-listen", "127.0.0.1:0"])
        c.scheduler_metrics = _metrics_url(c.scheduler)
        proc = c.start_server("m1", "256MiB", 1, "--metrics-listen", "127.0.0.1:0")
        c.server_metrics = _metrics_url(proc)
        c.monitor_tls = c.identity("monitor", "prometheus")
        c.bob_tls = c.identity("client", "bob")
        c.attached = 0
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def busy(pool):
    """Bob's session, launching and syncing in a loop (after one INVALID_HANDLE of its own)
    until the module is done: the load the measured session's figures must hold under."""
    with pool.scheduler_client(tls=pool.bob_tls) as s:
        lease = s.attach("cpu", memory=16 * MiB, share=0.5)
    pool.attached += 1
    dev = connect_lease(lease, tls=pool.bob_tls)
    fn = dev.function(dev.load_module(harp.CATALOG_IMAGE, "catalog"), "fill_f32")
    buf = dev.alloc(1 << 16)
    dev.free(buf)
    dev.launch(fn, 16, 256, [buf, np.float32(2), np.int64(4096)])
    with pytest.raises(harp.InvalidHandleError):
        dev.synchronize()
    buf = dev.alloc(1 << 16)
    stop, rounds = threading.Event(), [0]

    def work():
        while not stop.is_set():
            for _ in range(20):
                dev.launch(fn, 16, 256, [buf, np.float32(1), np.int64(4096)])
            dev.synchronize()
            rounds[0] += 1
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    assert wait_until(lambda: rounds[0] >= 3)
    yield lease
    stop.set()
    thread.join(30)
    dev.close()


def scrape(url: str, tls) -> list:
    """GET the metrics over HTTPS with `tls`'s certificate; the parsed families."""
    context = ssl.create_default_context(cafile=str(tls.ca))
    context.load_cert_chain(str(tls.cert), str(tls.key))
    with urllib.request.urlopen(url, context=context, timeout=15) as reply:
        assert reply.status == 200
        return list(text_string_to_metric_families(reply.read().decode()))


def value(families: list, name: str, **labels) -> float | None:
    """The one sample `name` with (at least) these labels, or None."""
    found = [s.value for f in families for s in f.samples
             if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) <= 1, f"{name} {labels}: {len(found)} samples"
    return found[0] if found else None


def test_a_sessions_figures_match_what_it_did_under_load(pool, busy):
    with pool.scheduler_client() as s:
        lease = s.attach("cpu", memory=64 * MiB, share=0.5)
    pool.attached += 1
    started = time.time()
    dev = connect_lease(lease, tls=pool.client_tls)
    calls = 0
    try:
        lib = dev.load_module(harp.CATALOG_IMAGE, "catalog")
        axpy = dev.function(lib, "axpy_f32")
        x, y, big = dev.alloc(4096), dev.alloc(4096), dev.alloc(3 * MiB)
        calls += 5
        for i in range(5):                                   # inline writes
            dev.write(x if i % 2 else y, 0, np.full(1024, i, np.float32))
        dev.write(big, 0, np.ones(3 * MiB, np.uint8))        # chunked, over the data channel
        calls += 6
        for _ in range(7):
            dev.launch(axpy, 4, 256, [y, x, np.float32(2), np.int64(1024)])
        calls += 7
        dev.free(x)
        dev.launch(axpy, 4, 256, [y, x, np.float32(2), np.int64(1024)])   # x is gone
        calls += 2
        with pytest.raises(harp.InvalidHandleError):
            dev.synchronize()
        calls += 1
        assert len(dev.read(y, 0, 4096)) == 4096
        assert len(dev.read(big, 0, 2 * MiB)) == 2 * MiB
        info = dev.mem_info()
        calls += 3
        assert dev._seq == calls

        families = scrape(pool.server_metrics, pool.monitor_tls)
        mine = dict(session=dev.session_id, lease=lease.lease_id, identity="client", device="0")
        assert value(families, "harp_session_calls_total", **mine) == calls
        assert value(families, "harp_session_write_bytes_total", **mine) == 5 * 4096 + 3 * MiB
        assert value(families, "harp_session_read_bytes_total", **mine) == 4096 + 2 * MiB
        assert value(families, "harp_session_errors_total", code="INVALID_HANDLE", **mine) == 1
        assert [s for f in families for s in f.samples if s.name == "harp_session_errors_total"
                and s.labels["session"] == dev.session_id] and all(
            s.labels["code"] == "INVALID_HANDLE" for f in families for s in f.samples
            if s.name == "harp_session_errors_total" and s.labels["session"] == dev.session_id)
        used = value(families, "harp_session_memory_used_bytes", **mine)
        assert used == info.total - info.free >= 4096 + 3 * MiB
        assert value(families, "harp_session_share_ratio", **mine) == 0.5
        assert value(families, "harp_session_received_bytes_total", **mine) >= 3 * MiB
        assert value(families, "harp_session_sent_bytes_total", **mine) >= 2 * MiB
        assert value(families, "harp_device_memory_total_bytes", device="0") == 256 * MiB
        assert value(families, "harp_device_memory_used_bytes", device="0") >= used
        assert value(families, "harp_device_sessions", device="0") == 2
        bob = [s.labels for f in families for s in f.samples
               if s.name == "harp_session_calls_total" and s.labels["identity"] == "bob"]
        assert bob and bob[0]["lease"] == busy.lease_id
        assert value(families, "harp_server_info", server="m1", backend="cpu",
                     isolation="process") == 1

        def device_seconds():           # a kernel's time reaches the books when its run ends
            dev.mem_info()
            return value(scrape(pool.server_metrics, pool.monitor_tls),
                         "harp_session_device_seconds_total", **mine)
        assert wait_until(lambda: device_seconds() > 0, timeout=10)
        assert device_seconds() <= time.time() - started
    finally:
        dev.close()
        with pool.scheduler_client() as s:
            s.detach(lease.lease_id)
    families = scrape(pool.server_metrics, pool.monitor_tls)
    assert not [s for f in families for s in f.samples
                if s.labels.get("session") == dev.session_id]     # its series went with it
    assert value(families, "harp_device_calls_total", device="0") > calls
    assert value(families, "harp_device_errors_total", device="0", code="INVALID_HANDLE") >= 2
    assert value(families, "harp_device_write_bytes_total", device="0") >= 5 * 4096 + 3 * MiB
    assert value(families, "harp_device_sessions_opened_total", device="0") >= 2


def test_the_scheduler_counts_attaches_refusals_and_leases_by_state(pool, busy):
    before = scrape(pool.scheduler_metrics, pool.monitor_tls)
    assert value(before, "harp_scheduler_servers", state="up") == 1
    assert value(before, "harp_scheduler_attach_seconds_count", outcome="attached") \
        == pool.attached
    with pool.scheduler_client() as s:
        leases = [s.attach("cpu", memory=8 * MiB, share=0.1) for _ in range(2)]
        with pytest.raises(harp.NoCapacityError):
            s.attach("cpu", memory=1 << 30)                  # more than the device
        with pytest.raises(harp.HarpError, match="no device of kind"):
            s.attach("fpga")
        s.detach(leases[0].lease_id)
    after = scrape(pool.scheduler_metrics, pool.monitor_tls)

    def delta(name, **labels):
        return value(after, name, **labels) - (value(before, name, **labels) or 0)
    assert delta("harp_scheduler_attach_seconds_count", outcome="attached") == 2
    assert delta("harp_scheduler_attach_seconds_count", outcome="refused") == 2
    assert delta("harp_scheduler_placement_failures_total", reason="no_room") == 1
    assert delta("harp_scheduler_placement_failures_total", reason="unknown_kind") == 1
    assert delta("harp_scheduler_placement_failures_total", reason="not_on_host") == 0
    assert delta("harp_scheduler_leases", state="ended") == 1
    assert delta("harp_scheduler_leases", state="active") == 1
    assert 0 < value(after, "harp_scheduler_attach_seconds_sum", outcome="attached") < 60
    assert value(after, "harp_scheduler_attach_seconds_bucket", outcome="attached",
                 le="+Inf") == value(after, "harp_scheduler_attach_seconds_count",
                                     outcome="attached")
    pool.attached += 2


def test_only_monitor_and_admin_certificates_read_metrics(pool):
    admin = pool.identity("admin", "admin")
    for url in (pool.server_metrics, pool.scheduler_metrics):
        assert scrape(url, admin)
        with pytest.raises(urllib.error.HTTPError) as refused:
            scrape(url, pool.client_tls)
        assert refused.value.code == 403
        plain = ssl.create_default_context(cafile=str(pool.client_tls.ca))   # no certificate
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(url, context=plain, timeout=15).read()
        with pytest.raises((urllib.error.URLError, ConnectionError)):   # nor plain HTTP
            urllib.request.urlopen(url.replace("https:", "http:"), timeout=15).read()


def test_a_monitor_certificate_opens_no_session_and_attaches_nothing(pool, busy):
    with pool.scheduler_client(tls=pool.monitor_tls) as s:
        with pytest.raises(harp.AuthError, match="monitor"):
            s.attach("cpu")
    with pytest.raises(harp.AuthError, match="monitor"):
        connect_lease(busy, tls=pool.monitor_tls, renew=False)
    families = scrape(pool.server_metrics, pool.monitor_tls)
    assert value(families, "harp_server_sessions_refused_total", code="AUTH") >= 1


def test_plain_text_metrics_only_on_loopback(tmp_path):
    out = subprocess.run([HARP, "server", "serve", "--insecure", "--listen", "127.0.0.1:0",
                          "--metrics-listen", "0.0.0.0:0"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1 and "loopback" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    from harp.metrics import MetricsEndpoint
    from prometheus_client import CollectorRegistry, Counter
    registry = CollectorRegistry()
    Counter("harp_probe", "a probe", registry=registry).inc(3)
    endpoint = MetricsEndpoint(registry, "127.0.0.1:0", insecure=True)
    endpoint.start()
    try:
        with urllib.request.urlopen(endpoint.url, timeout=15) as reply:
            assert "harp_probe_total 3.0" in reply.read().decode()
    finally:
        endpoint.stop()


def test_the_grafana_dashboard_names_only_live_metrics(pool, busy):
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", ())]
    assert len(exprs) >= 10
    named = {m for e in exprs for m in re.findall(r"\bharp_[a-z_]+", e)}
    live = set()
    for url in (pool.server_metrics, pool.scheduler_metrics):
        for family in scrape(url, pool.monitor_tls):
            live.add(family.name)
            live.update(s.name for s in family.samples)
    missing = sorted(n for n in named if n not in live)
    assert not missing, f"the dashboard names metrics no scrape has: {missing}"
