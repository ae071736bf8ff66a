"""The catalog's fast scalar conversion (every backend's launch path) agrees with its checked path."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from harp.catalog import fast_scalar as _fast_scalar
from harp.errors import ArgumentError

DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64"]


def _checked(value, dtype):
    try:
        with np.errstate(over="raise"):
            return np.dtype(dtype).type(value)
    except (OverflowError, FloatingPointError, ValueError, TypeError):
        return ArgumentError


@given(st.sampled_from(DTYPES), st.one_of(st.integers(-2**70, 2**70), st.floats()))
def test_a_fast_scalar_is_what_the_checked_path_makes(dtype, value):
    fast = _fast_scalar(value, dtype)
    if fast is None:
        return                                      # left to the checked path
    checked = _checked(value, dtype)
    assert checked is not ArgumentError
    assert type(fast) is type(checked)
    assert fast == checked or (math.isnan(float(fast)) and math.isnan(float(checked)))


@pytest.mark.parametrize("value, dtype", [(300, "int8"), (-1, "uint8"), (1e39, "float32"),
                                          (70000.0, "float16"), (2**64, "uint64"),
                                          (True, "int32"), (1.5, "int32"), (10**400, "float64")])
def test_what_might_not_fit_takes_the_checked_path(value, dtype):
    assert _fast_scalar(value, dtype) is None
