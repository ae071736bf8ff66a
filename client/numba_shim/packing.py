"""Kernel arguments that a launch cannot carry as they are, for numba-python devices.

A launch carries arrays of numeric dtypes and numeric scalars. numba also takes
complex scalars, tuples and namedtuples (of anything it takes), records (NumPy
structured scalars) and arrays of record, string and datetime dtypes. For a
numba-python device (Numba's simulator on a cpu device) such an argument is
*packed*: sent as launch arguments that can travel (a complex as two floats, a
tuple as its elements, a record or a non-numeric array as the bytes of its memory,
a `uint8` view of the same device buffer), with a *layout* that says how to rebuild
it. The kernel's module then carries `__harp_args__(args)`, generated from the
layout, which the device calls on the launch's arguments before the kernel runs:
the kernel gets a complex, a tuple, a namedtuple of the same name and fields, a
record, or an array of its own dtype over the device's memory. A layout is part of
the module's cache key, so each distinct layout loads its own module once.
"""
from __future__ import annotations

from typing import Any

import numpy as np

#: Helper name in generated modules.
UNPACK = "__harp_args__"
_NP = "__harp_np__"

#: A layout: one spec per kernel parameter.
#:   ("arg",)                          one launch argument, as it is
#:   ("py",)                           one Python scalar (its NumPy scalar -> .item())
#:   ("complex", dtype | None)         two float arguments; None: a Python complex
#:   ("tuple", name | None, fields | None, (spec, ...))  a tuple or namedtuple
#:   ("record", dtype literal)         one uint8 array: the record's bytes
#:   ("array", dtype literal, shape, strides, offset)   one uint8 array over the memory
Spec = tuple


def dtype_literal(dt: np.dtype, numpy: str = _NP) -> str:
    """Python source that rebuilds dtype `dt` (record, string, datetime, numeric), with NumPy
    spelled `numpy`."""
    if dt.fields is not None:
        names = list(dt.names)
        formats = [dtype_literal(dt.fields[n][0], numpy) for n in names]
        offsets = [dt.fields[n][1] for n in names]
        fields = (f"{{'names': {names!r}, 'formats': [{', '.join(formats)}], "
                  f"'offsets': {offsets!r}, 'itemsize': {dt.itemsize}, "
                  f"'aligned': {bool(dt.isalignedstruct)}}}")
        if dt.type is np.record:        # a recarray's: its elements are np.record
            return f"{numpy}.dtype(({numpy}.record, {numpy}.dtype({fields})))"
        return f"{numpy}.dtype({fields})"
    if dt.subdtype is not None:
        base, shape = dt.subdtype
        return f"{numpy}.dtype(({dtype_literal(base, numpy)}, {shape!r}))"
    return f"{numpy}.dtype({dt.str!r})"


def needs_packing(dt: np.dtype) -> bool:
    """Whether arrays of `dt` travel as bytes (everything but plain numeric dtypes)."""
    return dt.kind not in "biufc" or dt.fields is not None or dt.subdtype is not None


def packable(value: Any) -> bool:
    """Whether `value` is a kernel argument that only a packed launch carries."""
    if isinstance(value, (complex, np.complexfloating, tuple, np.void, np.datetime64,
                          np.timedelta64)):
        return True
    dtype = getattr(value, "dtype", None)
    return isinstance(dtype, np.dtype) and getattr(value, "ndim", 0) > 0 and \
        needs_packing(dtype)


def is_plain(layout: tuple[Spec, ...]) -> bool:
    """Whether a layout needs no `__harp_args__` (every parameter is one argument)."""
    return all(spec[0] in ("arg", "py") for spec in layout)


def unpack_source(layout: tuple[Spec, ...]) -> str:
    """`__harp_args__(args)`: the kernel's arguments from the launch's, per `layout`."""
    lines = [f"import numpy as {_NP}", "import collections as __harp_collections__", ""]
    classes: list[str] = []
    position = [0]

    def take() -> str:
        position[0] += 1
        return f"args[{position[0] - 1}]"

    def build(spec: Spec, nested: bool) -> str:
        kind = spec[0]
        if kind == "arg":
            return take()
        if kind == "py":
            return f"{take()}.item()" if nested else take()
        if kind == "complex":
            real, imag = take(), take()
            value = f"complex({real}, {imag})"
            return value if spec[1] is None else f"{_NP}.{spec[1]}({value})"
        if kind == "tuple":
            _, name, fields, items = spec
            parts = [build(s, True) for s in items]
            if name is None:
                return "(" + "".join(p + ", " for p in parts) + ")"
            cls = f"__harp_tuple_{len(classes)}__"
            classes.append(f"{cls} = __harp_collections__.namedtuple({name!r}, {fields!r})")
            return f"{cls}({', '.join(parts)})"
        if kind == "record":
            return f"{take()}.view({spec[1]})[0]"
        if kind == "array":
            _, dtype, shape, strides, offset = spec
            return (f"{_NP}.ndarray({shape!r}, {dtype}, buffer={take()}, offset={offset}, "
                    f"strides={strides!r})")
        raise ValueError(f"unknown argument layout {kind!r}")

    values = [build(spec, False) for spec in layout]
    lines += classes
    lines.append(f"def {UNPACK}(args):")
    lines.append("    return [" + ", ".join(values) + "]")
    return "\n".join(lines) + "\n"
