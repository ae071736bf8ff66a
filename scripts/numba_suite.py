#!/usr/bin/env python3
"""numba-cuda's own test suite under `harp run`: how unmodified a numba program can be.

Fetches nothing: the tests ship in the numba-cuda wheel (`numba/cuda/tests/{cudapy,
cudasim,doc_examples}`). They are copied into a temporary package (`harpsuite`, their
imports of each other rewritten to it) so that under `harp run` the tests' own
`from numba import cuda` is HARP's while numba's harness (`numba.cuda.testing`) stays
numba's (see numba_suite_conftest.py). Then they run with pytest:

- `sim`: in Numba's CUDA simulator, without HARP: the tests that pass here are the
  denominator;
- `local`: `harp run --device local:cpu` (the cpu device in the test's own process);
- `remote`: `harp run --device harp://...` against a pool server on 127.0.0.1 (port 0,
  mutual TLS with an ephemeral CA, trusted client code) that this script starts and stops.

Every mode runs with NUMBA_ENABLE_CUDASIM=1, so numba's own skip markers choose the same
tests (a cpu device is the simulator). Prints, per mode, how many of the denominator pass,
and the rest grouped by cause (exception type and first line); writes everything as JSON.

    .venv/bin/python scripts/numba_suite.py [--modes sim,local,remote] [-k EXPR]
        [--json results/numba-suite.json] [--workers 2] [--timeout 120] [--min-rate 0.9]
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
SUITES = ("cudapy", "cudasim", "doc_examples")
PACKAGE = "harpsuite"
MODES = ("sim", "local", "remote")
#: Variables of HARP and numba that must not leak from the caller into the runs.
CLEAN = ("HARP_RUN_DEVICE", "HARP_RUN_TRACE", "HARP_RUN_CERT_DIR", "HARP_DEVICE", "HARP_TRACE",
         "HARP_TRACE_PAYLOADS", "NUMBA_ENABLE_CUDASIM", "HARP_SUITE_RESULTS")


def wheel_tests() -> Path:
    """numba-cuda's test folder, as installed."""
    spec = importlib.util.find_spec("numba_cuda")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("numba_suite: numba-cuda is not installed (pip install -e '.[numba]')")
    path = Path(list(spec.submodule_search_locations)[0]) / "numba" / "cuda" / "tests"
    if not all((path / s).is_dir() for s in SUITES):
        sys.exit(f"numba_suite: {path} lacks the test folders {SUITES}")
    return path


def relocate(tests: Path, dest: Path) -> Path:
    """Copy the suites into `dest/harpsuite`, their imports of each other pointing there."""
    root = dest / PACKAGE
    root.mkdir(parents=True)
    (root / "__init__.py").write_text("")
    pattern = re.compile(r"numba\.cuda\.tests\.(" + "|".join(SUITES) + r")\b")
    for suite in SUITES:
        shutil.copytree(tests / suite, root / suite,
                        ignore=shutil.ignore_patterns("__pycache__"))
        for path in (root / suite).rglob("*.py"):
            text = path.read_text()
            if path.name == "__init__.py" and "load_testsuite" in text:
                text = ""       # unittest's loader hook; pytest collects the files itself
            path.write_text(pattern.sub(PACKAGE + r".\1", text))
    shutil.copy(HERE / "numba_suite_conftest.py", dest / "conftest.py")
    (dest / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n"
                                     "filterwarnings = ignore\n")
    return root


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEAN}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["NUMBA_ENABLE_CUDASIM"] = "1"
    env.update(extra)
    return env


def run_mode(mode: str, workdir: Path, prefix: list[str], args: argparse.Namespace
             ) -> dict[str, dict[str, str]]:
    """Run the relocated suite once; {nodeid: {outcome, cause}}."""
    results = workdir / f"results-{mode}.json"
    cmd = [*prefix, str(BIN / "python"), "-m", "pytest", PACKAGE, "-q", "-rN",
           f"--timeout={args.timeout}", "-n", str(args.workers)]
    if args.k:
        cmd += ["-k", args.k]
    started = time.monotonic()
    try:
        out = subprocess.run(cmd, cwd=workdir, env=base_env(HARP_SUITE_RESULTS=str(results)),
                             capture_output=True, text=True, timeout=args.mode_timeout)
    except subprocess.TimeoutExpired:
        sys.exit(f"numba_suite: mode {mode} ran past {args.mode_timeout} s")
    took = time.monotonic() - started
    if not results.exists():
        sys.exit(f"numba_suite: mode {mode} wrote no results (exit {out.returncode}):\n"
                 f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    print(f"{mode}: {took:.0f} s, {(out.stdout.strip().splitlines() or [''])[-1]}",
          flush=True)
    data = json.loads(results.read_text())
    data["__seconds__"] = {"outcome": "", "cause": f"{took:.1f}"}
    return data


class RemotePool:
    """A pool server on 127.0.0.1:0 with mutual TLS (ephemeral CA), trusting client code."""

    def __init__(self, directory: Path) -> None:
        from harp.backends import load_backend
        from harp.security import ephemeral_pool, server_credentials
        from harp.server import PoolServer
        server_tls, self.tls = ephemeral_pool(directory)
        self.server = PoolServer(load_backend("cpu", memory="4GiB"), trust_client_code=True)
        address = self.server.start(["127.0.0.1:0"], server_credentials(server_tls),
                                    server_tls)[0]
        self.options = ["--device", f"harp://{address}", "--tls-ca", str(self.tls.ca),
                        "--tls-cert", str(self.tls.cert), "--tls-key", str(self.tls.key)]

    def stop(self) -> None:
        self.server.stop(grace=0.5)


def _file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def normalize(cause: str) -> str:
    """A failure's cause without what differs between tests (addresses, kernel names)."""
    cause = re.sub(r"0x[0-9a-f]+", "0x..", cause)
    cause = re.sub(r"\(kernel \w+, argument \d+\)", "(kernel K, argument N)", cause)
    return re.sub(r"\b(kernel|device function) [\w.<>]+", r"\1 F", cause)


def score(sim: dict, got: dict) -> dict[str, Any]:
    """How many of the tests that pass in the simulator pass in `got`, and why the rest fail."""
    wanted = sorted(k for k, v in sim.items() if v["outcome"] == "passed")
    broken = {_file_of(k): v["cause"] for k, v in got.items() if v["outcome"] == "error"}
    causes: dict[str, list[str]] = collections.defaultdict(list)
    passed = 0
    for nodeid in wanted:
        entry = got.get(nodeid)
        if entry is not None and entry["outcome"] == "passed":
            passed += 1
            continue
        if entry is None:
            cause = broken.get(_file_of(nodeid), "not run (not collected)")
        elif entry["outcome"] == "skipped":
            cause = "skipped under harp run"
        else:
            cause = entry["cause"]
        causes[normalize(cause)].append(nodeid)
    ranked = sorted(causes.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return {"denominator": len(wanted), "passed": passed,
            "rate": round(passed / len(wanted), 4) if wanted else 0.0,
            "failures": [{"cause": c, "count": len(ids), "tests": ids} for c, ids in ranked]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="sim,local,remote",
                        help="comma-separated, of sim, local, remote (sim is always run)")
    parser.add_argument("-k", default="", help="pytest -k expression: run a subset")
    parser.add_argument("--json", default="", help="write the results here")
    parser.add_argument("--workers", type=int, default=2, help="pytest-xdist workers per mode")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per test")
    parser.add_argument("--mode-timeout", type=int, default=1500, help="seconds per mode")
    parser.add_argument("--causes", type=int, default=40, help="causes to print per mode")
    parser.add_argument("--min-rate", type=float, default=0.0,
                        help="exit 1 if a mode's pass rate is below this (0..1)")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad or args.workers < 1 or args.timeout < 1 or not 0 <= args.min_rate <= 1:
        parser.error(f"modes are {', '.join(MODES)}; workers and timeout are positive; "
                     "--min-rate is between 0 and 1")
    with tempfile.TemporaryDirectory(prefix="harp-numba-suite-") as tmp:
        workdir = Path(tmp)
        relocate(wheel_tests(), workdir)
        subprocess.run([str(BIN / "harp"), "run", "--install-hook"], env=base_env(),
                       capture_output=True, check=True, timeout=120)
        runs = {"sim": run_mode("sim", workdir, [], args)}
        pool = None
        try:
            for mode in modes:
                if mode == "local":
                    prefix = [str(BIN / "harp"), "run", "--device", "local:cpu", "--"]
                elif mode == "remote":
                    pool = pool or RemotePool(workdir / "pool")
                    prefix = [str(BIN / "harp"), "run", *pool.options, "--"]
                else:
                    continue
                runs[mode] = run_mode(mode, workdir, prefix, args)
        finally:
            if pool is not None:
                pool.stop()
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "k": args.k, "modes": {}}
    for mode, got in runs.items():
        seconds = float(got.pop("__seconds__")["cause"])
        if mode == "sim":
            counts = collections.Counter(v["outcome"] for v in got.values())
            report["sim"] = {"seconds": seconds, "outcomes": dict(counts)}
            print(f"\nsim: {dict(counts)}")
            continue
        result = score(runs["sim"], got)
        result["seconds"] = seconds
        report["modes"][mode] = result
        print(f"\n{mode}: {result['passed']} of {result['denominator']} tests that pass in the "
              f"simulator pass under harp run ({100 * result['rate']:.1f}%)")
        for entry in result["failures"][:args.causes]:
            print(f"  {entry['count']:4d}  {entry['cause'][:160]}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    low = [m for m, r in report["modes"].items() if r["rate"] < args.min_rate]
    if low:
        print(f"numba_suite: below {args.min_rate:.0%}: {', '.join(low)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
