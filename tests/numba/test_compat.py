"""What numba's own test suite asks of numba.cuda (scripts/numba_suite.py runs the suite
itself): tests/numba/programs/compat.py prints one line per behaviour, in Numba's simulator and
under `harp run` on a local cpu device and through a pool server; each behaviour is a test."""
from __future__ import annotations

import pytest

from .conftest import base_env, harp_run_cmd, reference_cmd, remote_options, run_all

MODES = ("local", "remote")


@pytest.fixture(scope="module")
def compat_runs(pool_server, tmp_path_factory, hook_installed):
    """{mode: {name: result}} for the reference (the simulator), local and remote."""
    jobs = {"reference": (reference_cmd("compat"), base_env(NUMBA_ENABLE_CUDASIM="1")),
            "local": (harp_run_cmd("compat", "--device", "local:cpu"), base_env()),
            "remote": (harp_run_cmd("compat", *remote_options(pool_server)), base_env())}
    runs = run_all(jobs, tmp_path_factory.mktemp("compat"))
    lines = {}
    for mode, done in runs.items():
        assert done.returncode == 0, f"{mode}:\n{done.stderr}"
        lines[mode] = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    return lines


@pytest.mark.parametrize("mode", MODES)
def test_every_behaviour_prints_what_it_prints_in_the_simulator(compat_runs, mode):
    mine = {k: v for k, v in compat_runs[mode].items() if not k.startswith("harp ")}
    assert mine == compat_runs["reference"]


@pytest.mark.parametrize("name, expected", [
    # numba.cuda's attributes and device-free submodules
    ("attributes", "True True <class 'int'>"),
    # a kernel made by exec() travels as its code object
    ("exec kernel", "[0.0, 3.0, 6.0, 9.0]"),
    # Python values arrive typed as numba types them
    ("python True", "1.0"),
    ("python int to ldexp", "3.1415"),
    ("python floats pick f64", "np.float64(0.30000000000000004)"),
    # launch configurations checked as numba checks them
    ("float griddim", "TypeError griddim must be a sequence of integers, got [2.0]"),
    ("no launch configuration", "True"),
    # a kernel's exception raised as its own type: at the launch of a debug kernel, at the
    # next sync otherwise (tests/numba/test_shim.py shows it waits for the sync)
    ("debug kernel exception", "ValueError raised in the kernel"),
    ("user exception", "UserError the program's own class"),
    # arguments a launch packs
    ("complex arguments", "[-3.0, 11.0]"),
    ("tuple arguments", "[3.5, 12.0]"),
    ("record arguments", "[2.5, 4.5, 6.5]"),
    ("string and datetime arrays", "[3, 366]"),
    # numba.cuda APIs
    ("cuda.Reduce", "55.0 9.0"),
    ("kernel called from a kernel", "[0.0, 2.0, 4.0, 6.0]"),
    ("extensions", "[0.0, 0.0]"),
    ("numba.cuda.random", "0.133123 0.876349 0.871091 0.936481"),
    ("per-thread default stream", "[0.0, 2.0, 4.0, 6.0]"),
    ("pinned and mapped arrays", "(2,) int32"),
    ("device_array_like of a view", "(8, 40)"),
])
@pytest.mark.parametrize("mode", MODES)
def test_behaviour(compat_runs, mode, name, expected):
    assert compat_runs["reference"][name] == expected        # the simulator's own answer
    assert compat_runs[mode].get(name) == expected


@pytest.mark.parametrize("mode", MODES)
def test_what_harp_refuses_it_names_and_says_why(compat_runs, mode):
    got = compat_runs[mode]
    assert got["harp numba.cuda.gpus[0]"].startswith(
        "UnsupportedError numba.cuda.gpus is not supported under HARP: a process has one "
        "HARP device")
    # a name numba's own numba.cuda lacks too is Python's ordinary ImportError
    assert got["harp from numba.cuda import no_such_name"].startswith(
        "ImportError cannot import name 'no_such_name' from 'numba.cuda'")
    # an attribute of numba's that HARP lacks says so, as an attribute (not a submodule)
    assert got["harp numba.cuda.devicearray"] == (
        "UnsupportedAttributeError numba.cuda.devicearray is not supported under HARP: HARP's "
        "numba.cuda does not provide it, being neither HARP's own API nor one of numba's "
        "device-free parts that HARP passes through")
