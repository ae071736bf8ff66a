"""`numba.cuda.random` under HARP: numba's xoroshiro128+ generators on the HARP device.

numba keeps each generator's state in a record array (`xoroshiro128p_dtype`) on the
device, made and seeded on the host (`create_xoroshiro128p_states`), and advanced by
device functions that kernels call (`xoroshiro128p_uniform_float32`, ...). Here the
states are a HARP device array, seeded by numba's own host code, and the device
functions are numba's own: a kernel that calls them takes them along as device
functions (numba's CPU `@jit` functions are sent as their source, `source.py`).
The numbers are numba's, bit for bit.
"""
from __future__ import annotations

import threading
import types
import warnings
from typing import Any

import numpy as np

from .devicearray import DeviceNDArray, new_array
from .submodules import import_real

#: numba.cuda.random's names that are numba's own (the dtype and the device functions).
NUMBA_NAMES = ("xoroshiro128p_dtype", "xoroshiro128p_type", "init_xoroshiro128p_state",
               "rotl", "xoroshiro128p_next", "xoroshiro128p_jump", "uint64_to_unit_float64",
               "uint64_to_unit_float32", "xoroshiro128p_uniform_float32",
               "xoroshiro128p_uniform_float64", "xoroshiro128p_normal_float32",
               "xoroshiro128p_normal_float64", "init_xoroshiro128p_states_cpu")

_MODULE: list[types.ModuleType] = []
_LOCK = threading.Lock()


def init_xoroshiro128p_states(states: DeviceNDArray, seed: int, subsequence_start: int = 0,
                              stream: Any = 0) -> None:
    """Seed the generators of `states` (a device array of `xoroshiro128p_dtype`), each
    2**64 steps from the previous one, as numba does (on the host, then copied over)."""
    numba_random = import_real("numba.cuda.random")
    host = np.empty(shape=states.shape, dtype=numba_random.xoroshiro128p_dtype)
    with warnings.catch_warnings():     # numba's CPU jit of its own seeding code may warn
        warnings.simplefilter("ignore")
        numba_random.init_xoroshiro128p_states_cpu(host, seed, subsequence_start)
    states.copy_to_device(host, stream=stream)


def create_xoroshiro128p_states(n: int, seed: int, subsequence_start: int = 0,
                                stream: Any = 0) -> DeviceNDArray:
    """A device array of `n` seeded generators (see `init_xoroshiro128p_states`)."""
    numba_random = import_real("numba.cuda.random")
    states = new_array((int(n),), numba_random.xoroshiro128p_dtype, stream=stream)
    init_xoroshiro128p_states(states, seed, subsequence_start, stream)
    return states


def module() -> types.ModuleType:
    """The `numba.cuda.random` a program gets under HARP (made on first use)."""
    if _MODULE:
        return _MODULE[0]
    with _LOCK:
        if not _MODULE:
            numba_random = import_real("numba.cuda.random")
            mod = types.ModuleType("numba.cuda.random", __doc__)
            for name in NUMBA_NAMES:
                mod.__dict__[name] = getattr(numba_random, name)
            mod.init_xoroshiro128p_states = init_xoroshiro128p_states
            mod.create_xoroshiro128p_states = create_xoroshiro128p_states
            mod.__harp_shim__ = False
            _MODULE.append(mod)
    return _MODULE[0]
