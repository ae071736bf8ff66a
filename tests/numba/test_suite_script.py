"""scripts/numba_suite.py, on a subset of numba-cuda's own tests: they are relocated out of the
wheel, run in the simulator and under `harp run` (local cpu device, and a pool server the
script starts on 127.0.0.1), and every one that passes in the simulator passes in both.
The whole suite is a documented command (docs/numba-suite.md); it takes minutes. Each
behaviour the suite needed has its own test in test_compat.py (the default run)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import base_env

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "numba_suite.py"
#: Files that cover what HARP added for the suite: kernel exceptions, complex arguments,
#: launch-configuration errors, Python scalars' types, numba.cuda.random, a doc example.
SUBSET = ("test_exception or test_userexc or test_complex_kernel or test_errors or "
          "test_frexp_ldexp or test_random or test_vecadd")


@pytest.mark.slow      # three pytest runs that import numba (~40 s of CPU); CI's slow step
def test_the_suite_passes_under_harp_run_where_it_passes_in_the_simulator(tmp_path,
                                                                          hook_installed):
    result = tmp_path / "suite.json"
    out = subprocess.run([sys.executable, str(SCRIPT), "-k", SUBSET, "--workers", "1",
                          "--json", str(result)], capture_output=True, text=True,
                         env=base_env(), cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(result.read_text())
    assert report["sim"]["outcomes"]["passed"] >= 20          # the subset is not empty
    for mode in ("local", "remote"):
        got = report["modes"][mode]
        assert got["denominator"] == report["sim"]["outcomes"]["passed"]
        assert got["failures"] == [], f"{mode}: {got['failures']}"
        assert got["passed"] == got["denominator"]
    assert "local: " in out.stdout and "(100.0%)" in out.stdout
