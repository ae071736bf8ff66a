"""`bench.py --profile DIR`: py-spy on the client and the server, cProfile on the client,
for the launch, bulk-write and sync paths."""
from __future__ import annotations

import json
import os
import sys
import time

from harness import Child, HERE, MiB, emit, log, start_harp_server, tls_paths

# ============================================================================
# profiling (--profile DIR)
# ============================================================================

def pyspy_exe():
    exe = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return exe if os.path.exists(exe) else None


def pyspy_prefix(out, rate=100):
    """Run a command under py-spy (all threads, native frames; --native needs blocking mode)."""
    exe = pyspy_exe()
    if not exe:
        return []
    return [exe, "record", "--format", "raw", "--threads", "--native",
            "--rate", str(rate), "--output", out, "--"]


def role_profile_client(a):
    """Client side of a profile run: the workload a.what, optionally under cProfile
    (main thread only; py-spy around the process sees every thread)."""
    import cProfile
    import numpy as np
    import harp
    _, cli = tls_paths(a.cert_dir)
    dev = harp.connect(a.url, tls=cli)
    prof = cProfile.Profile() if a.out else None
    if a.what == "launch":
        mod = dev.load_module(harp.CATALOG_IMAGE, "catalog")
        noop = dev.function(mod, "noop")
        for _ in range(5000):
            dev.launch(noop, 1, 1, [])
        dev.synchronize()

        def work():
            for _ in range(a.n):
                dev.launch(noop, 1, 1, [])
            dev.synchronize()
            return a.n, "launch/s"
    elif a.what == "write":
        n = a.bulk
        data = os.urandom(MiB) * (n // MiB)
        buf = dev.alloc(n)
        dev.write(buf, 0, data)
        dev.synchronize()

        def work():
            for _ in range(8):
                dev.write(buf, 0, data)
                dev.synchronize()
            return 8 * n / 1e9, "GB/s"
    else:  # sync
        dev.synchronize()

        def work():
            for _ in range(a.n):
                dev.synchronize()
            return a.n, "rt/s"
    if prof:
        prof.enable()
    t0 = time.perf_counter()
    amount, unit = work()
    dt = time.perf_counter() - t0
    if prof:
        prof.disable()
        prof.dump_stats(a.out)
    dev.close()
    emit({"rate": amount / dt, "unit": unit, "seconds": dt})


def collapse_top(path, top=25):
    """Sample shares per thread and per function from a py-spy raw (collapsed) file.

    'leaf' counts the innermost frame (a native frame when py-spy resolved one);
    'python self' charges each sample to its innermost *Python* frame, which is
    what to optimise in Python code (time in C called from there included).
    """
    import collections
    leaf, pyself, incl, threads = (collections.Counter() for _ in range(4))
    total = 0
    try:
        with open(path) as f:
            for line in f:
                stack, _, cnt = line.rstrip("\n").rpartition(" ")
                if not stack:
                    continue
                cnt = int(cnt)
                total += cnt
                raw = stack.split(";")
                frames = [_func_key(fr) for fr in raw]
                threads[frames[0]] += cnt
                leaf[frames[-1]] += cnt
                py = [f for f, r in zip(frames[1:], raw[1:]) if ".py:" in r or ".py)" in r]
                pyself[py[-1] if py else "(no Python frame: %s)" % frames[-1]] += cnt
                for fr in set(py):
                    incl[fr] += cnt
    except OSError:
        return "(no py-spy output at %s)\n" % path
    pct = lambda v: 100.0 * v / max(total, 1)  # noqa: E731
    out = ["%s: %d samples of running threads (idle threads are not sampled)"
           % (os.path.basename(path), total), "  by thread:"]
    out += ["    %5.1f%%  %s" % (pct(v), k) for k, v in threads.most_common(8)]
    out.append("  python self (innermost Python frame):")
    out += ["    %5.1f%%  %s" % (pct(v), k) for k, v in pyself.most_common(top)]
    out.append("  leaf frame (native where resolved):")
    out += ["    %5.1f%%  %s" % (pct(v), k) for k, v in leaf.most_common(12)]
    out.append("  python inclusive:")
    out += ["    %5.1f%%  %s" % (pct(v), k) for k, v in incl.most_common(top)]
    return "\n".join(out) + "\n"


def _func_key(frame):
    """'fn (path/file.py:12)' -> 'fn (dir/file.py)'; native frames keep their library."""
    name, _, where = frame.partition(" (")
    where = where[:-1] if where.endswith(")") else where
    if ":" in where:
        where = where.rsplit(":", 1)[0]
    where = "/".join(where.split("/")[-2:])
    if name.startswith("0x"):
        name = "?"
    return "%s (%s)" % (name, where) if where else name


def _profile_pass(a, what, server_spy, client_spy, cprof):
    """One server + one client run of workload `what`; returns the client's result."""
    children = []
    try:
        _, url = start_harp_server(a.cert_dir, children,
                                   prefix=pyspy_prefix(server_spy) if server_spy else ())
        argv = (pyspy_prefix(client_spy) if client_spy else []) + [
            sys.executable, HERE, "--role", "profile-client", "--cert-dir", a.cert_dir,
            "--url", url, "--what", what, "--bulk", str(a.bulk), "--n",
            str(a.profile_n if what == "launch" else max(a.profile_n // 100, 2000))]
        if cprof:
            argv += ["--out", cprof]
        c = Child("profile client", argv)
        children.append(c)
        line = c.wait_line(lambda ln: ln.startswith("RESULT "), 300)
        c.proc.wait(60)
        return json.loads(line[7:])
    finally:
        for ch in reversed(children):
            ch.stop(60)


def run_profile(a):
    """Profile the launch, bulk-write and sync paths: for each, one pass with py-spy
    on both processes (rates barely perturbed), one with cProfile on the client."""
    import io
    import pstats
    from pathlib import Path
    from harp.security import ephemeral_pool
    os.makedirs(a.profile, exist_ok=True)
    ephemeral_pool(Path(a.cert_dir))
    if not pyspy_exe():
        log("py-spy not found next to %s (pip install py-spy): only cProfile runs" % sys.executable)
    report = []
    for what in ("launch", "write", "sync"):
        log("[profile %s] ..." % what)
        srv_out = os.path.join(a.profile, "server-%s.pyspy.txt" % what)
        cli_out = os.path.join(a.profile, "client-%s.pyspy.txt" % what)
        cprof = os.path.join(a.profile, "client-%s.cprofile" % what)
        spy = pyspy_exe() is not None
        r1 = _profile_pass(a, what, srv_out if spy else None, cli_out if spy else None, None) \
            if spy else None
        r2 = _profile_pass(a, what, None, None, cprof)
        report.append("=" * 100)
        report.append("%s path | under py-spy: %s | client under cProfile: %s"
                      % (what, json.dumps(r1), json.dumps(r2)))
        for key, title in (("tottime", "tottime"), ("cumulative", "cumulative")):
            s = io.StringIO()
            pstats.Stats(cprof, stream=s).sort_stats(key).print_stats(18)
            report.append("-- client cProfile (main thread), by %s --" % title)
            report.append("\n".join(ln for ln in s.getvalue().splitlines()[6:] if ln.strip()))
        if spy:
            report.append("-- client py-spy (all threads) --")
            report.append(collapse_top(cli_out, 20))
            report.append("-- server py-spy (all threads) --")
            report.append(collapse_top(srv_out, 25))
    text = "\n".join(report)
    with open(os.path.join(a.profile, "profile-summary.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
