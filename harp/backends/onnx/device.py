"""`OnnxDevice`: one session on an ONNX Runtime device.

A `HostDevice` (host-memory buffers, streams on a few pool threads, events with
real timestamps; numbering, handles, quota and deferred errors from
`BackendDevice`) whose kernels are ONNX Runtime sessions: the catalog's graphs
(`graphs`) and the models a client loads as "onnx" images.

A model is data, not code: loading one needs no trust. It is refused
(`ArgumentError`) when it is a str, does not parse, keeps tensors in external
files (a model must not make the server read files; `EPContext` nodes, which
may name a cache file, are refused for the same reason), or ONNX Runtime does
not load it. Its image's bytes count against the session's memory while it is
loaded; the image is bounded by `harp.wire.MAX_IMAGE` like every module.

A model has one function, "main". Launching it ignores grid and block; its
arguments are one per graph input, in order, then one per graph output, in
order: each an `ArrayArg` (dtype, shape, C-contiguous), or for an input of one
element a `Scalar`. Dtypes and ranks and static dimensions are checked against
the model when the launch is issued (a deferred `ArgumentError` naming the
input or output); each result is checked against its output argument when the
run ends (a mismatch writes nothing and is a deferred `ArgumentError`), then
copied into it.

Not supported: non-tensor inputs and outputs (sequences, maps, optionals,
sparse tensors), strings and bfloat16/float8 elements (no NumPy dtype travels
them), device-resident buffers (with a provider other than the CPU's, ONNX
Runtime copies inputs and outputs on every run), and accounting of the host
memory ONNX Runtime takes beyond the image: a model's intermediate tensors, and
what constant folding makes while the model loads, are bounded only by the host.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from ... import catalog
from ...errors import ArgumentError, DeviceError
from ...tenancy import ComputeGate, MemoryBroker
from ...types import ArrayArg, DeviceInfo, Scalar
from ..base import Loaded
from ..host import HostDevice, HostKernel
from . import graphs

#: The one function of a loaded model.
ENTRY = "main"
#: Intra-op threads of a model's session (catalog graphs get one).
MODEL_THREADS = max(1, min(2, os.cpu_count() or 1))
#: Longest part of an ONNX Runtime message an error carries.
MESSAGE_LIMIT = 600

#: ONNX TensorProto element types HARP buffers carry, as NumPy dtypes.
ELEMENT_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32",
                  7: "int64", 9: "bool", 10: "float16", 11: "float64", 12: "uint32",
                  13: "uint64"}
#: Public operator domains, as ONNX Runtime names them -> as a model imports them.
DOMAINS = {"": "ai.onnx", "ai.onnx.ml": "ai.onnx.ml", "com.microsoft": "com.microsoft"}

_OPSETS: dict[int, dict[str, int]] = {}


def supported_opsets(ort: Any) -> dict[str, int]:
    """The newest opset of each public operator domain this ONNX Runtime knows ({} when
    it does not say)."""
    key = id(ort)
    if key not in _OPSETS:
        found: dict[str, int] = {}
        try:
            for schema in ort.capi._pybind_state.get_all_operator_schema():
                domain = DOMAINS.get(schema.domain)
                if domain is not None:
                    found[domain] = max(found.get(domain, 0), int(schema.since_version))
        except Exception:
            found = {}
        _OPSETS[key] = found
    return _OPSETS[key]


def _cut(text: str) -> str:
    return text if len(text) <= MESSAGE_LIMIT else text[:MESSAGE_LIMIT] + " [cut]"


class Runtime:
    """The onnxruntime module a backend drives and the execution providers its devices use."""

    def __init__(self, ort: Any, providers: tuple[str, ...], skipped: dict[str, str]) -> None:
        self.ort = ort
        self.providers = providers
        self.skipped = skipped
        self.version = str(getattr(ort, "__version__", "") or "unknown")
        self.opsets = supported_opsets(ort)

    def session(self, image: bytes, threads: int) -> Any:
        return self.ort.InferenceSession(image, graphs.session_options(self.ort, threads=threads),
                                         providers=list(self.providers))


# -- models ----------------------------------------------------------------------------------

class Port:
    """One graph input or output: its name, NumPy dtype, and shape (None for a dimension
    the model leaves open; the shape is None when even the rank is)."""

    __slots__ = ("name", "dtype", "shape")

    def __init__(self, name: str, dtype: np.dtype, shape: tuple[int | None, ...] | None) -> None:
        self.name, self.dtype, self.shape = name, dtype, shape

    def describe(self) -> str:
        dims = "?" if self.shape is None else \
            "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"
        return f"{self.dtype.name}{dims}"

    def takes_scalar(self) -> bool:
        return self.shape is None or all(d in (None, 1) for d in self.shape)


class Model:
    """A loaded model: its session and its inputs and outputs, in order."""

    __slots__ = ("session", "inputs", "outputs", "output_names")

    def __init__(self, session: Any, inputs: list[Port], outputs: list[Port]) -> None:
        self.session, self.inputs, self.outputs = session, inputs, outputs
        self.output_names = [p.name for p in outputs]

    def signature(self) -> str:
        ins = ", ".join(f"{p.name}: {p.describe()}" for p in self.inputs)
        outs = ", ".join(f"{p.name}: {p.describe()}" for p in self.outputs)
        return f"({ins}) -> ({outs})"


def parse_model(image: bytes) -> Any:
    """The ModelProto of an image, checked to read no files: `ArgumentError` otherwise."""
    import onnx
    try:
        model = onnx.load_from_string(image)
    except Exception as exc:
        raise ArgumentError(f"not an ONNX model (the image does not parse as a ModelProto): "
                            f"{_cut(str(exc))}") from None
    for tensor in _tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
            raise ArgumentError(
                f"the model keeps tensor {tensor.name or '(unnamed)'!r} in external data; "
                "this device loads only self-contained models (a model must not make the "
                "server read files): save it with all tensors inside "
                "(onnx.save_model(model, path, save_as_external_data=False))")
    for node in _nodes(model):
        if node.op_type == "EPContext":
            raise ArgumentError("the model has an EPContext node (a precompiled provider "
                                "blob, which may name a file on the server); this device "
                                "loads only models of operators")
    return model


def _graph_nodes(graph: Any):
    for node in graph.node:
        yield node
        yield from _attribute_nodes(node)


def _attribute_nodes(node: Any):
    for attr in node.attribute:
        for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            yield from _graph_nodes(g)


def _nodes(model: Any):
    """Every node of a model: its graph's, its subgraphs', its functions', its training
    graphs'."""
    yield from _graph_nodes(model.graph)
    for fn in model.functions:
        for node in fn.node:
            yield node
            yield from _attribute_nodes(node)
    for info in model.training_info:
        yield from _graph_nodes(info.initialization)
        yield from _graph_nodes(info.algorithm)


def _graphs(model: Any):
    """Every graph of a model (subgraphs of every node included)."""
    yield model.graph
    for info in model.training_info:
        yield info.initialization
        yield info.algorithm
    for node in _nodes(model):
        for attr in node.attribute:
            if attr.HasField("g"):
                yield attr.g
            yield from attr.graphs


def _tensors(model: Any):
    """Every TensorProto of a model: initializers (sparse ones too) and attribute
    tensors, in every graph and function."""
    for graph in _graphs(model):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
    for node in _nodes(model):
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            sparse = ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + \
                list(attr.sparse_tensors)
            for s in sparse:
                yield s.values
                yield s.indices


def _port(value_info: Any, role: str) -> Port:
    kind = value_info.type.WhichOneof("value")
    if kind != "tensor_type":
        raise ArgumentError(f"{role} {value_info.name!r} is a {kind or 'untyped value'}; this "
                            "device passes only tensors")
    tensor = value_info.type.tensor_type
    dtype = ELEMENT_DTYPES.get(tensor.elem_type)
    if dtype is None:
        import onnx
        try:
            elem = onnx.TensorProto.DataType.Name(tensor.elem_type)
        except ValueError:
            elem = str(tensor.elem_type)
        raise ArgumentError(f"{role} {value_info.name!r} has {elem} elements, which this device "
                            f"cannot carry (it carries {', '.join(ELEMENT_DTYPES.values())})")
    shape = None
    if tensor.HasField("shape"):
        shape = tuple(int(d.dim_value) if d.HasField("dim_value") else None
                      for d in tensor.shape.dim)
    return Port(value_info.name, np.dtype(dtype), shape)


def load_model(runtime: Runtime, image: bytes | str) -> Model:
    """A model image loaded into a session of `runtime` (`ArgumentError` when refused)."""
    if isinstance(image, str):
        raise ArgumentError("an onnx image is the bytes of a serialized ModelProto, not a str")
    proto = parse_model(image)
    try:
        session = runtime.session(image, MODEL_THREADS)
    except Exception as exc:
        raise ArgumentError(f"ONNX Runtime does not load the model: {_cut(str(exc))}") from None
    declared = {v.name: v for v in list(proto.graph.input) + list(proto.graph.output)}
    ports = []
    for role, args in (("input", session.get_inputs()), ("output", session.get_outputs())):
        ports.append([_port(declared[a.name], role) for a in args])
    return Model(session, ports[0], ports[1])


class ModelKernel(HostKernel):
    """The function-table entry of a model's "main"."""

    __slots__ = ("model",)

    def __init__(self, model: Model) -> None:
        super().__init__(None, _model_runner(model), ENTRY)
        self.model = model


class Bound:
    """A model launch resolved against real memory: the feeds, and the output views."""

    __slots__ = ("feeds", "outputs")

    def __init__(self, feeds: dict[str, np.ndarray], outputs: list[np.ndarray]) -> None:
        self.feeds, self.outputs = feeds, outputs


def _model_runner(model: Model) -> Any:
    session, names, ports = model.session, model.output_names, model.outputs

    def run(grid: Any, block: Any, shared: int, bound: Bound) -> None:
        try:
            results = session.run(names, bound.feeds)
        except Exception as exc:
            message = f"ONNX Runtime failed to run the model: {_cut(str(exc))}"
            if type(exc).__name__ == "InvalidArgument":
                raise ArgumentError(message) from None
            raise DeviceError(message) from None
        results = [np.asarray(r) for r in results]
        for port, view, got in zip(ports, bound.outputs, results):
            if got.dtype != view.dtype or got.shape != view.shape:
                raise ArgumentError(
                    f"output {port.name!r} of the run is {got.dtype.name}{list(got.shape)}, but "
                    f"its argument is {view.dtype.name}{list(view.shape)} (nothing was written)")
        for view, got in zip(bound.outputs, results):
            np.copyto(view, got)
    return run


# -- the device ----------------------------------------------------------------------------

class OnnxDevice(HostDevice):
    """A session on an ONNX Runtime device: its own handles, streams, quota and deferred
    errors; models and catalog graphs run on the runtime's providers."""

    def __init__(self, runtime: Runtime, index: int, info: DeviceInfo, memory: MemoryBroker, *,
                 compute: ComputeGate | None = None, trust_client_code: bool = False) -> None:
        super().__init__(info, memory, name=f"harp-onnx{index}", compute=compute,
                         trust_client_code=trust_client_code)
        self._runtime = runtime

    # -- kernels -------------------------------------------------------------------------
    def _load(self, image: bytes | str, format: str) -> Model:
        return load_model(self._runtime, image)        # "onnx": the base checked the format

    def _catalog_target(self, kernel: catalog.Kernel) -> HostKernel:
        rt = self._runtime
        return HostKernel(kernel, graphs.runner(rt.ort, rt.providers, kernel), kernel.name)

    def _lookup(self, loaded: Loaded, name: str) -> HostKernel:
        if name != ENTRY:
            raise ArgumentError(f"an onnx module has one function, {ENTRY!r} (the model's "
                                f"graph); it has no {name!r}")
        return ModelKernel(loaded.payload)

    def _prepare(self, target: HostKernel, grid: tuple[int, int, int],
                 block: tuple[int, int, int], args: list) -> Any:
        if target.kernel is not None:
            spans, values = self._catalog_spans(target.kernel, args)
            return graphs.bind(target.kernel, spans, values)
        return self._bind(target.model, args)

    def _bind(self, model: Model, args: list) -> Bound:
        """A model launch's arguments checked against the model and the real buffers."""
        nin, nout = len(model.inputs), len(model.outputs)
        if len(args) != nin + nout:
            raise ArgumentError(
                f"the model {model.signature()} takes {nin + nout} arguments (its {nin} "
                f"inputs, then its {nout} outputs), got {len(args)}")
        feeds = {p.name: self._input(p, a) for p, a in zip(model.inputs, args)}
        outputs = [self._array(p, a, "output") for p, a in zip(model.outputs, args[nin:])]
        return Bound(feeds, outputs)

    def _input(self, port: Port, arg: Any) -> np.ndarray:
        if isinstance(arg, Scalar):
            if not port.takes_scalar():
                raise ArgumentError(f"input {port.name!r} is {port.describe()}, more than one "
                                    "element: pass an ArrayArg, not a Scalar")
            if arg.dtype != port.dtype.name:
                raise ArgumentError(f"input {port.name!r} is {port.describe()}, got a "
                                    f"{arg.dtype} scalar")
            shape = () if port.shape is None else (1,) * len(port.shape)
            return np.full(shape, catalog.scalar_value(arg.value, arg.dtype), port.dtype)
        return self._array(port, arg, "input")

    def _array(self, port: Port, arg: Any, role: str) -> np.ndarray:
        """The view of an `ArrayArg` for `port`, checked against it and against its
        buffer."""
        if not isinstance(arg, ArrayArg):
            also = " (or a Scalar, for one element)" if role == "input" and \
                port.takes_scalar() else ""
            raise ArgumentError(f"{role} {port.name!r} ({port.describe()}) must be an "
                                f"ArrayArg{also}, got {type(arg).__name__}")
        if arg.dtype != port.dtype.name:
            raise ArgumentError(f"{role} {port.name!r} is {port.describe()}, got a {arg.dtype} "
                                "array")
        shape = arg.shape
        if port.shape is not None and (len(shape) != len(port.shape) or any(
                want is not None and want != got for want, got in zip(port.shape, shape))):
            raise ArgumentError(f"{role} {port.name!r} is {port.describe()}, got shape "
                                f"{list(shape)}")
        mem = self._mem(arg.buffer)
        try:
            view = np.ndarray(shape, port.dtype, buffer=mem, offset=arg.offset,
                              strides=arg.strides)
        except (TypeError, ValueError) as exc:
            raise ArgumentError(f"{role} {port.name!r}: array {arg.dtype}{list(shape)} at offset "
                                f"{arg.offset} does not fit its buffer of {mem.size} bytes: "
                                f"{exc}") from None
        if not view.flags.c_contiguous:
            raise ArgumentError(f"{role} {port.name!r}: the array must be C-contiguous (strides "
                                f"{list(arg.strides or ())} for shape {list(shape)})")
        return view
