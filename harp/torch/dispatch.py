"""Every ATen operator on a `harp` tensor, as torch's dispatcher hands it to HARP.

Autograd and torch's composite operators run above, on the client, as for any
device; what reaches `dispatch` is a primitive operator. For each one:

1. **Shapes on the client.** The operator runs on torch's `meta` device over
   tensors with the same sizes, strides and storage offsets (one meta storage per
   HARP buffer, so views alias as they do on the device). Its meta results say
   what the call makes: a tensor the operator returned from its arguments (in
   place, `out=`), a view of an argument's storage, or a new tensor.
2. **Views are free.** An operator that only makes views (`view`, `transpose`,
   slicing, `expand`, `detach`, ...) sends nothing: the new tensor shares the
   buffer with other sizes and strides.
3. **Everything else is one launch**, queued like any other: new results get
   new buffers (allocated asynchronously too) and the operator is sent by name
   with its arguments (`harp.aten_ops`), to run on the pool server. Nothing
   waits for the network until a value is needed: `.cpu()`, `.item()`,
   `print`, `bool(t)`.

An operator HARP does not run raises `harp.UnsupportedError` naming it; there is
no silent fallback to the CPU. A random operator given a CPU `torch.Generator`
is the one exception, by design: its numbers are drawn on the client with that
generator (as torch on the CPU would draw them) and written to the device.
"""
from __future__ import annotations

from typing import Any

import json

import numpy as np
import torch
from torch.utils import _pytree as pytree

from ..aten_ops import OPERATORS
from ..errors import ArgumentError, UnsupportedError
from .session import TorchSession, current
from .tensor import HarpTensor, contiguous_strides, new_tensor, numpy_name, to_cpu

aten = torch.ops.aten
META = torch.device("meta")


class _Call:
    """The meta picture of one call: meta stand-ins for its HARP tensors."""

    def __init__(self) -> None:
        self.session: TorchSession | None = None
        self.originals: dict[int, HarpTensor] = {}    # id(meta) -> the harp tensor
        self.bases: dict[tuple, torch.Tensor] = {}    # (storage, dtype) -> meta base
        self.storages: dict[int, Any] = {}            # meta storage id -> HarpStorage

    def meta(self, value: Any) -> Any:
        if isinstance(value, HarpTensor):
            storage = value.harp_storage
            if self.session is None:
                self.session = storage.session
            elif storage.session is not self.session:
                raise ArgumentError("harp tensors of two HARP sessions in one operator")
            key = (id(storage), value.dtype)
            base = self.bases.get(key)
            if base is None:
                n = storage.nbytes // value.element_size()
                base = self.bases[key] = torch.empty(n, dtype=value.dtype, device=META)
                self.storages[base.untyped_storage()._cdata] = storage
            m = base.as_strided(value.shape, value.stride(), value.storage_offset())
            self.originals[id(m)] = value
            return m
        if isinstance(value, torch.Tensor):
            if value.device.type == "cpu" and value.dim() == 0:
                return value.to(META)
            raise ArgumentError(f"expected all tensors on device harp, got one on {value.device}"
                                f" of shape {list(value.shape)}")
        if isinstance(value, torch.device):
            return META
        return value


def dispatch(func: Any, args: tuple, kwargs: dict) -> Any:
    special = SPECIAL.get(func)
    if special is not None:
        return special(func, args, kwargs)
    return _run(func, args, kwargs)


class _Plan:
    """What one spelling of a call does (cached by `_key`): how to build its results from
    its arguments, the new tensors it makes, and the launch it sends (None: views only)."""

    __slots__ = ("spec", "results", "outputs", "name", "recipe")

    def __init__(self, spec: Any, results: list, outputs: list, name: str | None,
                 recipe: list) -> None:
        self.spec, self.results, self.outputs = spec, results, outputs
        self.name, self.recipe = name, recipe


_PLANS: dict[Any, _Plan] = {}
_MAX_PLANS = 4096
_SIMPLE = (bool, int, float, str, type(None), torch.dtype, torch.device, torch.memory_format,
           torch.layout)


def _leaves(args: tuple, kwargs: dict) -> list:
    """The call's arguments, flat, in the order `_encode` visits them. (No recursive
    closure: one would be a reference cycle holding the tensors until the collector ran.)"""
    out: list = []
    _walk(args, out)
    for v in kwargs.values():
        _walk(v, out)
    return out


def _walk(v: Any, out: list) -> None:
    if type(v) in (list, tuple):
        for x in v:
            _walk(x, out)
    else:
        out.append(v)


def _key(func: Any, args: tuple, kwargs: dict, leaves: list) -> Any:
    """A hashable spelling of the call's shapes and constants (None: not cacheable)."""
    parts: list = [func, _shape_of(args), tuple(kwargs)]
    storages: dict[int, int] = {}
    for v in leaves:
        if type(v) is HarpTensor:
            st = v.harp_storage
            parts.append((tuple(v.shape), v.stride(), v.storage_offset(), v.dtype,
                          storages.setdefault(id(st), len(storages)), st.nbytes))
        elif isinstance(v, torch.Tensor):
            if v.dim():
                return None
            parts.append(("cpu", v.dtype))
        elif isinstance(v, _SIMPLE):
            parts.append((type(v), v))
        else:
            return None
    return tuple(parts)


def _shape_of(v: Any) -> Any:
    if type(v) in (list, tuple):
        return tuple(_shape_of(x) for x in v)
    return 0


def _run(func: Any, args: tuple, kwargs: dict) -> Any:
    leaves = _leaves(args, kwargs)
    if any(isinstance(v, torch.Generator) for v in leaves):
        return _with_cpu_generator(func, args, kwargs)
    key = _key(func, args, kwargs, leaves)
    plan = _PLANS.get(key) if key is not None else None
    if plan is None:
        plan = _plan(func, args, kwargs, leaves)
        if key is not None:
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.clear()
            _PLANS[key] = plan
    session = None
    for v in leaves:
        if type(v) is HarpTensor:
            s = v.harp_storage.session
            if session is None:
                session = s
            elif s is not session:
                raise ArgumentError("harp tensors of two HARP sessions in one operator")
    if session is None:
        session = current()
    outs = [new_tensor(session, size, stride, dtype, offset)
            for size, stride, dtype, offset in plan.outputs]
    built = []
    for d in plan.results:
        kind = d[0]
        if kind == "new":
            built.append(outs[d[1]])
        elif kind == "same":
            built.append(leaves[d[1]])
        elif kind == "view":
            _, i, size, stride, offset, dtype = d
            built.append(HarpTensor(leaves[i].harp_storage, size, stride, offset, dtype))
        else:
            built.append(d[1])
    if plan.name is not None:
        session.launch(plan.name, [o.array_arg() for o in outs] +
                       _launch_args(plan.recipe, leaves))
    return pytree.tree_unflatten(built, plan.spec)


def _plan(func: Any, args: tuple, kwargs: dict, leaves: list) -> _Plan:
    """Run the call on meta tensors and say what it does (see the module's docstring)."""
    call = _Call()
    margs, mkwargs = pytree.tree_map(call.meta, (args, kwargs))
    try:
        mresult = func(*margs, **mkwargs)
    except NotImplementedError:
        raise UnsupportedError(f"the operator {func} has no shape rule for HARP's device") \
            from None
    schema = func._schema
    mutates = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
    index = {id(v): i for i, v in enumerate(leaves) if type(v) is HarpTensor}
    by_storage: dict[int, int] = {}
    for i, v in enumerate(leaves):
        if type(v) is HarpTensor:
            by_storage.setdefault(id(v.harp_storage), i)
    outputs: list = []
    flat, spec = pytree.tree_flatten(mresult)
    results: list = []
    for m in flat:
        if not isinstance(m, torch.Tensor):
            results.append(("const", m))
            continue
        same = call.originals.get(id(m))
        if same is not None:                         # in place, or out=
            if tuple(m.shape) != tuple(same.shape) or m.stride() != same.stride():
                raise UnsupportedError(f"{func} changes a harp tensor's shape in place")
            results.append(("same", index[id(same)]))
            continue
        storage = call.storages.get(m.untyped_storage()._cdata)
        if storage is not None:                      # a view of an argument
            results.append(("view", by_storage[id(storage)], tuple(m.shape), m.stride(),
                            m.storage_offset(), m.dtype))
            continue
        numpy_name(m.dtype)
        results.append(("new", len(outputs)))
        outputs.append((tuple(m.shape), m.stride(), m.dtype, m.storage_offset()))
    name, recipe = None, []
    if outputs or mutates:
        name, recipe = _encode(func, args, kwargs, len(outputs))
    return _Plan(spec, results, outputs, name, recipe)


def _encode(func: Any, args: tuple, kwargs: dict, n_out: int) -> tuple[str, list]:
    """The call's function name (`harp.aten_ops`) and where each launch argument after the
    outputs comes from: (kind, leaf index)."""
    packet = func._schema.name.split("::", 1)[-1]
    if packet not in OPERATORS:
        raise UnsupportedError(f"HARP does not run the operator aten::{packet} "
                               f"({func}) on its torch device yet")
    recipe: list = []
    types = {a.name: a.type for a in func._schema.arguments}
    positional = [a.type for a in func._schema.arguments]
    leaf = [0]

    def placeholder(kind: str) -> dict:
        recipe.append((kind, leaf[0]))
        return {kind: n_out + len(recipe) - 1}

    def enc(value: Any, kind: Any) -> Any:
        if type(value) in (list, tuple):
            inner = getattr(kind, "getElementType", None)
            element = inner() if inner is not None else None
            return [enc(v, element) for v in value]
        try:
            return enc_leaf(value, kind)
        finally:
            leaf[0] += 1

    def enc_leaf(value: Any, kind: Any) -> Any:
        if isinstance(value, HarpTensor):
            return placeholder("t")
        if isinstance(value, torch.Tensor):                  # a 0-dim CPU tensor
            return placeholder("c")
        if isinstance(value, (bool, int, float)):
            if kind is not None and "Scalar" in str(kind):
                return placeholder("s")
            return value
        if isinstance(value, torch.dtype):
            return {"dt": numpy_name(value)}
        if isinstance(value, torch.memory_format):
            return {"mf": str(value).rsplit(".", 1)[-1]}
        if isinstance(value, torch.layout):
            if value is not torch.strided:
                raise UnsupportedError(f"HARP's torch device has only strided tensors, not {value}")
            return {"ly": "strided"}
        if isinstance(value, torch.device):
            return {"dv": 0}
        if value is None or isinstance(value, str):
            return value
        raise UnsupportedError(f"{func}: an argument of type {type(value).__name__} "
                               "cannot be sent to HARP's device")

    targs = [enc(v, positional[i] if i < len(positional) else None)
             for i, v in enumerate(args)]
    tkwargs = {k: enc(v, types.get(k)) for k, v in kwargs.items()}
    overload = f"{packet}.{func._overloadname}"
    return json.dumps([overload, n_out, targs, tkwargs], separators=(",", ":")), recipe


def _launch_args(recipe: list, leaves: list) -> list:
    """The launch arguments after the outputs, from the call's leaves (see `_encode`)."""
    out: list = []
    for kind, i in recipe:
        v = leaves[i]
        if kind == "t":
            out.append(v.array_arg())
        elif kind == "c":
            out.append(v.detach().numpy()[()])
        else:
            out.append(np.bool_(v) if type(v) is bool else
                       np.int64(v) if type(v) is int else np.float64(v))
    return out


# -- the operators HARP answers on the client ----------------------------------------------

def from_cpu(session: TorchSession, value: torch.Tensor) -> HarpTensor:
    """A new harp tensor holding a CPU tensor's values (contiguous)."""
    value = value.detach().contiguous()
    t = new_tensor(session, value.shape, contiguous_strides(value.shape), value.dtype)
    if value.numel():
        session.device.write(t.harp_storage.buffer, 0, value.numpy().reshape(-1).view(np.uint8))
    return t


def _copy(func: Any, args: tuple, kwargs: dict) -> Any:
    dst, src = args[0], args[1]
    if isinstance(dst, HarpTensor) and isinstance(src, HarpTensor):
        return _run(func, args, kwargs)                   # on the device
    if isinstance(dst, HarpTensor):                       # CPU -> device
        session = dst.harp_storage.session
        value = src.to(dst.dtype).expand(dst.shape)
        if dst.is_contiguous() and dst.numel():
            data = value.contiguous().numpy().reshape(-1).view(np.uint8)
            session.device.write(dst.harp_storage.buffer,
                                 dst.storage_offset() * dst.element_size(), data)
            return dst
        staged = from_cpu(session, value)
        return _run(func, (dst, staged), {})
    dst.copy_(to_cpu(src))                                # device -> CPU
    return dst


def _to_copy(func: Any, args: tuple, kwargs: dict) -> Any:
    device = kwargs.get("device")
    if device is not None and torch.device(device).type == "cpu":
        rest = {k: v for k, v in kwargs.items() if k in ("dtype", "memory_format")}
        value = to_cpu(args[0])
        return value.to(**rest) if rest else value
    return _run(func, args, kwargs)


def _scalar(func: Any, args: tuple, kwargs: dict) -> Any:
    return to_cpu(args[0]).item()


def _equal(func: Any, args: tuple, kwargs: dict) -> bool:
    return torch.equal(to_cpu(args[0]), to_cpu(args[1]))


def _empty_like(func: Any, args: tuple, kwargs: dict) -> Any:
    call = _Call()
    margs, mkwargs = pytree.tree_map(call.meta, (args, kwargs))
    m = func(*margs, **mkwargs)
    return new_tensor(call.session or current(), m.shape, m.stride(), m.dtype)


def _resize(func: Any, args: tuple, kwargs: dict) -> Any:
    t, size = args[0], tuple(args[1])
    if tuple(t.shape) == size:
        return t
    raise UnsupportedError("resizing a harp tensor in place (aten::resize_) is not supported")


def _with_cpu_generator(func: Any, args: tuple, kwargs: dict) -> Any:
    """A random operator with a CPU generator: drawn here, as the CPU would, then written."""
    session = next(v.harp_storage.session for v in pytree.tree_leaves((args, kwargs))
                   if isinstance(v, HarpTensor))
    cpu: dict[int, torch.Tensor] = {}

    def down(v: Any) -> Any:
        if isinstance(v, HarpTensor):
            cpu[id(v)] = c = to_cpu(v)
            return c
        if isinstance(v, torch.device):
            return torch.device("cpu")
        return v
    cargs, ckwargs = pytree.tree_map(down, (args, kwargs))
    result = func(*cargs, **ckwargs)
    back = {id(c): h for h in pytree.tree_leaves((args, kwargs)) if isinstance(h, HarpTensor)
            for c in [cpu.get(id(h))] if c is not None}

    def up(r: Any) -> Any:
        if isinstance(r, torch.Tensor):
            original = back.get(id(r))
            if original is not None:
                _copy(aten.copy_.default, (original, r), {})
                return original
            return from_cpu(session, r)
        return r
    return pytree.tree_map(up, result)


def factory_empty(size: Any, *, dtype: Any = None, layout: Any = None, device: Any = None,
                  pin_memory: Any = None, memory_format: Any = None) -> HarpTensor:
    dtype = dtype or torch.get_default_dtype()
    m = torch.empty(size, dtype=dtype, device=META,
                    memory_format=memory_format or torch.contiguous_format)
    return new_tensor(current(), m.shape, m.stride(), dtype)


def factory_empty_strided(size: Any, stride: Any, *, dtype: Any = None, layout: Any = None,
                          device: Any = None, pin_memory: Any = None) -> HarpTensor:
    return new_tensor(current(), tuple(size), tuple(stride), dtype or torch.get_default_dtype())


#: Factories whose results torch would otherwise make by resizing an empty tensor.
FACTORIES = ("arange", "arange.start", "arange.start_step", "linspace", "eye", "eye.m",
             "full", "randperm")


def factory(name: str) -> Any:
    packet, _, overload = name.partition(".")
    op = getattr(getattr(aten, packet), overload or "default")

    def make(*args: Any, **kwargs: Any) -> Any:
        return _run(op, args, kwargs)
    return make


SPECIAL = {
    aten.copy_.default: _copy,
    aten._to_copy.default: _to_copy,
    aten._local_scalar_dense.default: _scalar,
    aten.equal.default: _equal,
    aten.empty_like.default: _empty_like,
    aten.new_empty.default: _empty_like,
    aten.new_empty_strided.default: _empty_like,
    aten.resize_.default: _resize,
}

HarpTensor.dispatcher = staticmethod(dispatch)
