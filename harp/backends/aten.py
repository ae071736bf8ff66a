"""PyTorch operators on a session's memory: the server side of the `aten` format, for
every backend that runs it.

`AtenModule` is what `load_module(b"", "aten")` makes for a session: where its
calls run (a `TorchPlace`: torch's device for them, the CPU for host memory),
the session's random generator on that device, and a parser for function names
(`harp.aten_ops` says how a call is spelled). `AtenModule.call(name)` checks a
name once (the operator is allowed, the template holds only the placeholders and
values the format knows, a device argument is the session's own) and gives an
`AtenCall`. At launch the backend makes each array argument a torch tensor over
the session's own buffer, without a copy (the cpu backend from its NumPy views,
here; the cuda backend through DLPack, `backends/cuda/aten.py`); `prepare`
checks the launch, `run` runs the operator by torch and copies its results into
the output arrays the client chose. Output shapes are checked against the
operator's meta result before anything runs, so a call cannot make the server
hold more than its outputs (which the client allocated, under its quota).
"""
from __future__ import annotations

import functools
import json
import threading
from typing import Any

import numpy as np

from .. import aten_ops
from ..errors import ArgumentError, DeviceError, UnsupportedError

_RNG_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def torch_available() -> bool:
    """Whether torch can be imported here (then host devices accept `aten` modules)."""
    import importlib.util
    return importlib.util.find_spec("torch") is not None


class TorchPlace:
    """Where a session's `aten` calls run: torch's device for them, and the generator a
    random operator that takes none draws from (that device's default one, which the
    session's own generator stands in for while the operator runs)."""

    def __init__(self, torch: Any, device: Any) -> None:
        self.torch, self.device = torch, device

    def default_generator(self) -> Any:
        return self.torch.default_generator


class AtenModule:
    """One session's `aten` module: where it runs, its generator and its parsed calls."""

    def __init__(self, place: TorchPlace | None = None) -> None:
        import torch
        self.torch = torch
        self.place = place if place is not None else TorchPlace(torch, torch.device("cpu"))
        self.device = self.place.device
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(0)

    def call(self, name: str) -> "AtenCall":
        try:
            spec = json.loads(name)
        except ValueError:
            raise ArgumentError(f"an aten function name is JSON [op, n_out, args, kwargs], got "
                                f"{name[:60]!r}") from None
        if type(spec) is not list or len(spec) != 4 or type(spec[0]) is not str \
                or type(spec[1]) is not int or type(spec[2]) is not list \
                or type(spec[3]) is not dict:
            raise ArgumentError("an aten function name is [op, n_out, args, kwargs]")
        return AtenCall(self, *spec)


class AtenCall:
    """One operator with its fixed arguments; `run` is its host-kernel runner."""

    def __init__(self, module: AtenModule, overload: str, n_out: int, args: list,
                 kwargs: dict) -> None:
        torch = module.torch
        self.module, self.overload, self.n_out = module, overload, n_out
        self.name = f"aten::{overload}"
        self.seed = overload == aten_ops.SEED
        if self.seed:
            self.op = None
        else:
            packet, _, variant = overload.partition(".")
            if packet not in aten_ops.OPERATORS:
                raise UnsupportedError(f"this server does not run the operator aten::{packet}")
            ops = getattr(torch.ops.aten, packet)
            variant = variant or "default"
            if variant not in ops.overloads():
                raise ArgumentError(f"aten::{packet} has no overload {variant!r}")
            self.op = getattr(ops, variant)
        self.random = aten_ops.packet_of(overload) in aten_ops.RANDOM
        if not 0 <= n_out <= 64:
            raise ArgumentError(f"an aten call writes 0..64 outputs, not {n_out}")
        self.placeholders: set[int] = set()
        self.args = [self._check(a, 0) for a in args]
        self.kwargs = {k: self._check(v, 0) for k, v in kwargs.items()}
        for key in kwargs:
            if type(key) is not str or not key.isidentifier():
                raise ArgumentError(f"bad keyword {str(key)[:40]!r} in an aten call")
        if self.op is not None:
            self._check_devices()
        self.arity = n_out + len(self.placeholders)
        if self.placeholders != set(range(n_out, self.arity)):
            raise ArgumentError("an aten call's placeholders must number its inputs "
                                f"{n_out}..{self.arity - 1}, each once")
        self._shapes: dict[Any, bool] = {}

    # -- the template ------------------------------------------------------------------
    def _check_devices(self) -> None:
        """A device argument may only be the session's own (`{"dv": 0}`) or none: never a
        device named by the tenant (another GPU of the server, say)."""
        device = self.module.device
        for i, arg in enumerate(self.op._schema.arguments):
            if "Device" not in str(arg.type):
                continue
            value = self.kwargs.get(arg.name) if arg.kwarg_only or i >= len(self.args) \
                else self.args[i]
            if value is not None and value != device:
                raise ArgumentError(f"{self.name}: a device argument must be the session's "
                                    "own device")

    def _check(self, node: Any, depth: int) -> Any:
        """The template node, checked; placeholders stay dicts, resolved per launch."""
        torch = self.module.torch
        t = type(node)
        if node is None or t in (bool, int, float):
            return node
        if t is str:
            if len(node) > aten_ops.MAX_STRING:
                raise ArgumentError("a string argument of an aten call is at most "
                                    f"{aten_ops.MAX_STRING} characters")
            return node
        if t is list:
            if depth >= aten_ops.MAX_DEPTH:
                raise ArgumentError("an aten call's arguments nest too deep")
            return [self._check(x, depth + 1) for x in node]
        if t is dict and len(node) == 1:
            (kind, value), = node.items()
            if kind in ("t", "s", "c") and type(value) is int:
                if value in self.placeholders:
                    raise ArgumentError(f"launch argument {value} is named twice")
                self.placeholders.add(value)
                return (kind, value)
            if kind == "dt" and value in aten_ops.DTYPES:
                return getattr(torch, value)
            if kind == "mf" and value in aten_ops.MEMORY_FORMATS:
                return getattr(torch, value)
            if kind == "ly" and value == "strided":
                return torch.strided
            if kind == "dv":
                return self.module.device
        raise ArgumentError(f"an aten call argument the format does not know: {str(node)[:60]}")

    def _resolve(self, node: Any, values: list) -> Any:
        t = type(node)
        if t is tuple:
            kind, i = node
            v = values[i]
            if kind == "t":
                if type(v) is not self.module.torch.Tensor:
                    raise ArgumentError(f"launch argument {i} of {self.name} must be an array")
                return v
            if type(v) is self.module.torch.Tensor:
                raise ArgumentError(f"launch argument {i} of {self.name} must be a number")
            return self.module.torch.tensor(v) if kind == "c" else v.item()
        if t is list:
            return [self._resolve(x, values) for x in node]
        return node

    # -- running -------------------------------------------------------------------------
    def check_dtype(self, dtype: np.dtype) -> None:
        """An array argument's dtype must be one the format knows."""
        if dtype.name not in aten_ops.DTYPES:
            raise ArgumentError(f"{self.name}: arrays of {dtype} are not supported")

    def prepare(self, args: list) -> list:
        """Launch arguments (arrays resolved to NumPy views of the session's host buffers,
        or to tensors the backend made over its own device memory, and NumPy scalars) as
        what `run` takes: tensors over the same memory, and scalars; checked."""
        if len(args) != self.arity:
            raise ArgumentError(f"{self.name} takes {self.arity} launch arguments, got "
                                f"{len(args)}")
        torch = self.module.torch
        out = []
        for i, a in enumerate(args):
            if type(a) is torch.Tensor:         # the backend's own, over its buffer
                out.append(a)
            elif isinstance(a, np.ndarray):
                self.check_dtype(a.dtype)
                try:
                    out.append(torch.from_numpy(a))
                except (TypeError, ValueError, RuntimeError) as exc:
                    raise ArgumentError(f"{self.name}: launch argument {i}: {exc}") from None
            elif isinstance(a, np.generic):
                out.append(a)
            else:
                raise ArgumentError(f"{self.name}: launch argument {i} must be an array or a "
                                    "scalar")
        for i in range(self.n_out):
            if type(out[i]) is not torch.Tensor:
                raise ArgumentError(f"{self.name}: output {i} must be an array")
        if self.seed:
            if len(out) != 1 or type(out[0]) is torch.Tensor:
                raise ArgumentError("seeding takes one number")
        elif self.n_out:
            self._check_outputs(out)
        return out

    def _check_outputs(self, values: list) -> None:
        """The results' shapes and dtypes, from the operator's meta run (cached), must be
        the outputs' own: nothing bigger is ever made."""
        torch = self.module.torch
        key = tuple((tuple(v.shape), tuple(v.stride()), v.dtype) if type(v) is torch.Tensor
                    else v.item() for v in values)
        if key in self._shapes:
            return
        metas = [torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta")
                 if type(v) is torch.Tensor else v for v in values]
        args = self._resolve(self.args, metas)
        kwargs = {k: self._resolve(v, metas) for k, v in self.kwargs.items()}
        kwargs = {k: (torch.device("meta") if isinstance(v, torch.device) else v)
                  for k, v in kwargs.items()}
        try:
            result = self.op(*args, **kwargs)
        except Exception as exc:
            raise ArgumentError(f"{self.name}: {type(exc).__name__}: {_first_line(exc)}") \
                from None
        results = _tensors(result)
        if len(results) < self.n_out:
            raise ArgumentError(f"{self.name} gives {len(results)} tensors, not {self.n_out}")
        for i, (r, o) in enumerate(zip(results, values)):
            if tuple(r.shape) != tuple(o.shape) or r.dtype != o.dtype:
                raise ArgumentError(f"{self.name}: result {i} is {r.dtype}{list(r.shape)}, its "
                                    f"output array {o.dtype}{list(o.shape)}")
        if len(self._shapes) >= 256:
            self._shapes.clear()
        self._shapes[key] = True

    def run(self, grid: tuple, block: tuple, shared: int, values: list) -> None:
        """Run the operator on the launch's tensors and write its results to the outputs."""
        if self.seed:
            self.module.generator.manual_seed(int(values[0].item()) & (2 ** 63 - 1))
            return
        args = self._resolve(self.args, values)
        kwargs = {k: self._resolve(v, values) for k, v in self.kwargs.items()}
        try:
            if self.random:
                result = self._with_generator(args, kwargs)
            else:
                result = self.op(*args, **kwargs)
            if self.n_out:
                for dst, src in zip(values[:self.n_out], _tensors(result)):
                    dst.copy_(src)
        except Exception as exc:
            raise DeviceError(f"{self.name} failed: {type(exc).__name__}: "
                              f"{_first_line(exc)}") from None

    def _with_generator(self, args: list, kwargs: dict) -> Any:
        """Run a random operator on the session's generator: as its device's default
        generator when the operator takes none (dropout), so that the numbers are torch's
        own on that device (on the CPU: the client's CPU run's)."""
        gen = self.module.generator
        default = self.module.place.default_generator()
        with _RNG_LOCK:
            saved = default.get_state()
            default.set_state(gen.get_state())
            try:
                return self.op(*args, **kwargs)
            finally:
                gen.set_state(default.get_state())
                default.set_state(saved)


def _tensors(result: Any) -> list:
    import torch
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        out = []
        for r in result:
            out.extend(_tensors(r))
        return out
    return []


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""
