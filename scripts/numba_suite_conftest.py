"""conftest.py of the relocated numba-cuda test suite (copied there by numba_suite.py).

numba's test harness (`numba.cuda.testing`, `numba.cuda.tests.support`) stays numba's:
under `harp run` it is imported here, with numba's own `numba.cuda` in place for the
duration, so the tests' own `from numba import cuda` still gets HARP's. Each test's outcome
and, for a failure, its exception's first line go to the JSON file named by
`HARP_SUITE_RESULTS` (written by the controlling process; pytest-xdist sends it every report).
"""
from __future__ import annotations

import json
import os

import pytest

HARNESS = ("numba.cuda.testing", "numba.cuda.tests.support", "numba.cuda.tests")

if os.environ.get("HARP_RUN_DEVICE"):
    import importlib

    import numba.cuda  # noqa: F401 - HARP's, through harp run's finder
    from harp.client.numba_shim.realcuda import real_numba_cuda
    with real_numba_cuda():
        for _name in HARNESS:
            importlib.import_module(_name)

_RESULTS: dict[str, dict[str, str]] = {}


def pytest_addoption(parser):  # noqa: ANN001, ANN201
    parser.addoption("--dump-failed-filechecks", action="store_true",
                     help="numba's own option: dump reproducers for failed FileCheck tests")


@pytest.fixture(scope="class")
def initialize_from_pytest_config(request):  # noqa: ANN001, ANN201
    """What numba-cuda's own conftest gives CUDATestCase (its FileCheck dump option)."""
    request.cls._dump_failed_filechecks = request.config.getoption("dump_failed_filechecks")


def _cause(report) -> str:  # noqa: ANN001
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    return (text.strip().splitlines() or [""])[0][:300]


def pytest_runtest_logreport(report) -> None:  # noqa: ANN001
    entry = _RESULTS.setdefault(report.nodeid, {"outcome": "passed", "cause": ""})
    if report.failed:
        if entry["outcome"] != "failed":
            entry.update(outcome="failed", cause=f"{report.when}: {_cause(report)}")
    elif report.skipped and report.when in ("setup", "call"):
        entry["outcome"] = "skipped"


def pytest_collectreport(report) -> None:  # noqa: ANN001
    if report.failed:
        _RESULTS[report.nodeid] = {"outcome": "error", "cause": f"collect: {_cause(report)}"}


def pytest_sessionfinish(session) -> None:  # noqa: ANN001
    path = os.environ.get("HARP_SUITE_RESULTS")
    if path and not hasattr(session.config, "workerinput"):
        with open(path, "w") as f:
            json.dump(_RESULTS, f, indent=0, sort_keys=True)
