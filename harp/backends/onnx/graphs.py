"""The kernel catalog as small ONNX graphs, and their ONNX Runtime sessions.

Every catalog kernel (`harp.catalog.KERNELS`) but `noop` is one ONNX graph,
built here with `onnx.helper` from the kernel's operation and element type. A
graph's inputs are the kernel's buffers it reads and its scalars of type T (as
0-d tensors); its one output is the buffer the kernel writes. Sizes (`n`, `m`,
`k`) travel as the shapes of the inputs, except for `fill`, which has no input
buffer and takes its shape as an int64 tensor.

The graphs follow the cpu backend's NumPy kernels operation by operation, so
the results are the same:

- integer `add`, `sub`, `mul`, `scale` and `axpy` wrap around (ONNX Runtime's
  integer Add, Sub and Mul do);
- integer `reduce_sum` is a CumSum whose last element is the sum: ONNX
  Runtime's integer ReduceSum accumulates in double and saturates, which is
  neither exact past 2**53 nor wrapping. Floating `reduce_sum` is a ReduceSum;
- `gemm` is ``alpha * MatMul(A, B) + beta * C`` with alpha and beta as inputs
  (ONNX's Gemm takes them as attributes, fixed per graph, and skips C when beta
  is 0, where `beta * C` of a NaN is NaN);
- `div` is IEEE division (x / 0 is inf).

Empty launches do not reach ONNX Runtime: `n == 0` writes nothing (reduce_sum
writes a zero), a gemm with `m` or `n` zero writes nothing; `noop` runs nothing.

A kernel's session is made on first use and kept for the process, shared by
every device session there (`InferenceSession.run` is thread-safe); one thread
per session, since catalog graphs are small and a device session runs several
streams at once.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ... import catalog
from ...errors import DeviceError

#: The ONNX opset and IR version the catalog graphs are written against (ONNX Runtime
#: has run both since 1.12).
OPSET = 17
IR_VERSION = 8


def onnx_type(dtype: str) -> int:
    """The ONNX TensorProto element type of a catalog dtype name."""
    from onnx import TensorProto
    return {"float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE,
            "int32": TensorProto.INT32, "int64": TensorProto.INT64}[dtype]


@dataclass(frozen=True)
class Plan:
    """How a kernel's launch arguments become a graph's feeds.

    `reads`: catalog parameters fed as graph inputs of the same name, in graph-input
    order (buffers as arrays, T scalars as 0-d arrays, `n` of fill as the shape [n]);
    `writes`: the buffer parameter the graph's one output (`OUTPUT`) is stored into.
    """
    reads: tuple[str, ...]
    writes: str


OUTPUT = "result"

#: op -> (reads, writes); the nodes are in `_nodes`.
PLANS: dict[str, Plan] = {
    "fill": Plan(("value", "n"), "out"),
    "scale": Plan(("x", "alpha"), "out"),
    "axpy": Plan(("alpha", "x", "y"), "y"),
    "add": Plan(("a", "b"), "out"),
    "sub": Plan(("a", "b"), "out"),
    "mul": Plan(("a", "b"), "out"),
    "div": Plan(("a", "b"), "out"),
    "reduce_sum": Plan(("x",), "out"),
    "gemm": Plan(("a", "b", "c", "alpha", "beta"), "c"),
}

_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div"}


def _nodes(kernel: catalog.Kernel) -> tuple[list, list]:
    """The nodes (and initializers) that compute `OUTPUT` from the plan's inputs."""
    from onnx import TensorProto, helper
    op, node = kernel.op.name, helper.make_node
    if op == "fill":
        return [node("Expand", ["value", "n"], [OUTPUT])], []
    if op == "scale":
        return [node("Mul", ["x", "alpha"], [OUTPUT])], []
    if op == "axpy":
        return [node("Mul", ["alpha", "x"], ["ax"]), node("Add", ["ax", "y"], [OUTPUT])], []
    if op in _BINARY:
        return [node(_BINARY[op], ["a", "b"], [OUTPUT])], []
    if op == "reduce_sum" and np.dtype(kernel.dtype).kind == "f":
        return [node("ReduceSum", ["x"], ["sum"], keepdims=0),
                node("Reshape", ["sum", "one"], [OUTPUT])], \
            [helper.make_tensor("one", TensorProto.INT64, [1], [1])]
    if op == "reduce_sum":                       # integers: wrap, exactly (module docstring)
        return [node("CumSum", ["x", "axis"], ["running"]),
                node("Slice", ["running", "last", "end"], [OUTPUT])], \
            [helper.make_tensor("axis", TensorProto.INT64, [], [0]),
             helper.make_tensor("last", TensorProto.INT64, [1], [-1]),
             helper.make_tensor("end", TensorProto.INT64, [1], [np.iinfo(np.int64).max])]
    if op == "gemm":
        return [node("MatMul", ["a", "b"], ["ab"]),
                node("Mul", ["alpha", "ab"], ["scaled"]),
                node("Mul", ["beta", "c"], ["kept"]),
                node("Add", ["scaled", "kept"], [OUTPUT])], []
    raise DeviceError(f"catalog kernel {kernel.name} has no onnx graph")


def _shape(kernel: catalog.Kernel, param: str) -> list:
    """The (symbolic) shape of a graph input or of the output, by catalog parameter."""
    if kernel.op.name == "gemm":
        return {"a": ["m", "k"], "b": ["k", "n"], "c": ["m", "n"]}.get(param, [])
    if param == "n" or (kernel.op.name == "reduce_sum" and param == "out"):
        return [1]
    kind = {p.name: p.kind for p in kernel.op.params}[param]
    return ["n"] if kind == "buffer" else []


def build(kernel: catalog.Kernel) -> Any:
    """The ONNX ModelProto of a catalog kernel (None for noop, which runs nothing)."""
    from onnx import TensorProto, helper
    if kernel.op.name == "noop":
        return None
    plan = PLANS.get(kernel.op.name)
    if plan is None:
        raise DeviceError(f"catalog kernel {kernel.name} has no onnx graph")
    elem = onnx_type(kernel.dtype)
    inputs = [helper.make_tensor_value_info(p, TensorProto.INT64 if p == "n" else elem,
                                            _shape(kernel, p)) for p in plan.reads]
    output = helper.make_tensor_value_info(OUTPUT, elem, _shape(kernel, plan.writes))
    nodes, initializers = _nodes(kernel)
    graph = helper.make_graph(nodes, kernel.name, inputs, [output], initializer=initializers)
    return helper.make_model(graph, producer_name="harp",
                             opset_imports=[helper.make_opsetid("", OPSET)],
                             ir_version=IR_VERSION)


# -- sessions, once per process ------------------------------------------------------------

_SESSIONS: dict[tuple, Any] = {}
_LOCK = threading.Lock()

Runner = Callable[[tuple[int, int, int], tuple[int, int, int], int, Any], None]


def session(ort: Any, providers: tuple[str, ...], kernel: catalog.Kernel) -> Any:
    """The process's ONNX Runtime session of `kernel` on `providers` (made on first use)."""
    key = (ort, providers, kernel.name)
    sess = _SESSIONS.get(key)
    if sess is None:
        with _LOCK:
            sess = _SESSIONS.get(key)
            if sess is None:
                model = build(kernel).SerializeToString()
                sess = ort.InferenceSession(model, session_options(ort, threads=1),
                                            providers=list(providers))
                _SESSIONS[key] = sess
    return sess


def session_options(ort: Any, *, threads: int) -> Any:
    """Session options for HARP: `threads` intra-op threads (no thread per core for each
    session), no inter-op pool, every graph optimization, errors reported as exceptions
    rather than logged."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 4
    return so


class Bound:
    """A catalog launch resolved against real memory: the feeds, and the array the
    result goes into (None when nothing is to run)."""

    __slots__ = ("feeds", "dest", "zero")

    def __init__(self, feeds: dict[str, np.ndarray], dest: np.ndarray | None,
                 zero: bool = False) -> None:
        self.feeds, self.dest, self.zero = feeds, dest, zero


def bind(kernel: catalog.Kernel, spans: list, values: dict[str, Any]) -> Bound:
    """A launch's checked arguments (`BackendDevice._catalog_spans`: a `CatalogSpan` per
    buffer, a NumPy scalar per scalar) as graph feeds and the destination view."""
    op = kernel.op.name
    if op == "noop":
        return Bound({}, None)
    t = np.dtype(kernel.dtype)
    arrays: dict[str, np.ndarray] = {}
    for p, arg in zip(kernel.op.params, spans):
        if p.kind == "buffer":
            flat = arg.mem[arg.offset:arg.offset + arg.nbytes].view(t)
            arrays[p.name] = flat
    if op == "gemm":
        m, n, k = int(values["m"]), int(values["n"]), int(values["k"])
        arrays["a"] = arrays["a"].reshape(m, k)
        arrays["b"] = arrays["b"].reshape(k, n)
        arrays["c"] = arrays["c"].reshape(m, n)
        empty = m == 0 or n == 0
    else:
        empty = int(values["n"]) == 0
    plan = PLANS[op]
    dest = arrays[plan.writes]
    if empty:                                      # nothing to compute (see the docstring)
        return Bound({}, dest if op == "reduce_sum" else None, zero=op == "reduce_sum")
    feeds: dict[str, np.ndarray] = {}
    for name in plan.reads:
        if name == "n":
            feeds[name] = np.array([int(values["n"])], np.int64)
        elif name in arrays:
            feeds[name] = arrays[name]
        else:
            feeds[name] = np.asarray(values[name])
    return Bound(feeds, dest)


def runner(ort: Any, providers: tuple[str, ...], kernel: catalog.Kernel) -> Runner:
    """The stream-thread runner of a catalog kernel (its session made now, once per
    process)."""
    if kernel.op.name == "noop":
        return lambda grid, block, shared, bound: None
    sess = session(ort, providers, kernel)
    outputs = [OUTPUT]
    name = kernel.name

    def run(grid: Any, block: Any, shared: int, bound: Bound) -> None:
        dest = bound.dest
        if dest is None:
            return
        if bound.zero:
            dest[...] = 0
            return
        try:
            result = sess.run(outputs, bound.feeds)[0]
        except Exception as exc:
            raise DeviceError(f"{name}: ONNX Runtime failed: {str(exc)[:500]}") from None
        np.copyto(dest, result.reshape(dest.shape))
    return run
