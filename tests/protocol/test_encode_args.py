"""The launch path's fast argument encoding gives the records the general path gives."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

from harp import wire
from harp.frontend import normalize_args
from harp.types import ArrayArg, Buffer, BufferArg, Scalar

BUF = Buffer(7, 4096)

kinds = st.one_of(
    st.just(BUF),
    st.integers(0, 4096).map(lambda o: BufferArg(BUF, o)),
    st.integers(-2**31, 2**31 - 1).map(lambda v: Scalar(v, "int32")),
    st.floats(allow_nan=False).map(lambda v: Scalar(v, "float64")),
    st.integers(-128, 127).map(np.int8),
    st.floats(-1e6, 1e6, allow_nan=False).map(np.float32),
    st.booleans().map(np.bool_),
    st.just(ArrayArg(BUF, "float32", (4, 8), 0, None)),
)


@given(st.lists(kinds, max_size=8))
def test_fast_encoding_matches_the_general_path(args):
    assert wire.encode_args(args) == [wire.encode_arg(a) for a in normalize_args(args)]


@pytest.mark.parametrize("bad", [3, 2.5, True, "x", object(), np.str_("s")])
def test_bare_python_scalars_and_strangers_are_refused_the_same_way(bad):
    with pytest.raises(TypeError) as fast:
        wire.encode_args([bad])
    with pytest.raises(TypeError) as general:
        normalize_args([bad])
    assert str(fast.value) == str(general.value)
    with pytest.raises(TypeError):                 # and again, after any caching
        wire.encode_args([bad])
