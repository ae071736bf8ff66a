"""A kernel as a "numba-python" module: its source, for Numba's simulator on a cpu device.

The module holds the kernel's own source and that of every device function it
calls (found through their globals, transitively), each under a plain
`@cuda.jit` / `@cuda.jit(device=True)` decorator, preceded by the globals they
read: modules (`import math`), numba's and NumPy's types and functions
(`from numba import float32`), and constants (numbers, strings, tuples, small
NumPy arrays), all fixed at their values at the first launch, as numba fixes
globals when it compiles. Anything else a kernel reads from its globals is
refused with an error that names it. A function with no source file (made by
`exec`, or in `python -c`) travels as its marshalled code object, rebuilt on the
device over the same globals (the device must run the same Python version).
"""
from __future__ import annotations

import ast
import enum
import builtins
import importlib
import inspect
import marshal
import sys
import textwrap
import types
from typing import Any, NoReturn

import numpy as np

from harp.errors import UnsupportedError

from .errors import HINT
from .functions import DeviceFunction
from .functions import KernelFunction as Dispatcher
from .intrinsics import KernelOnly, check_kernel_code, global_names
from .kernelerrors import register
from .packing import dtype_literal

#: The largest global NumPy array a kernel may read (it travels inside the source).
MAX_GLOBAL_ARRAY = 1 << 20
_CUDA = "__harp_cuda__"
_CODE_FUNCTION = "__harp_code_function__"
#: Rebuilds a function with no source from its marshalled code object (see
#: `_Builder._code_function`), over the generated module's globals.
CODE_FUNCTION_SOURCE = f"""
def {_CODE_FUNCTION}(code, name, defaults, version):
    import marshal, sys, types
    if tuple(sys.version_info[:2]) != version:
        raise ImportError("kernel %s was sent as Python %d.%d bytecode (it has no source "
                          "file); this device runs Python %d.%d" % ((name,) + version
                          + tuple(sys.version_info[:2])))
    code = marshal.loads(bytes.fromhex(code))
    scope = globals()
    cells = tuple(types.CellType(scope[n]) for n in code.co_freevars) or None
    return types.FunctionType(code, scope, name, defaults, cells)
"""


def kernel_source(kernel: Any) -> str:
    """The numba-python module for `kernel` (a shim `Dispatcher`)."""
    builder = _Builder(kernel.py_func.__name__, bool(kernel.targetoptions.get("debug")))
    builder.add(kernel.py_func, device=False)
    return builder.render()


class _Builder:
    def __init__(self, kernel: str, debug: bool = False) -> None:
        self.kernel = kernel
        self.debug = debug                    # the simulator raises on float errors then
        self.values: dict[str, Any] = {}      # global name -> value
        self.lines: dict[str, str] = {}       # global name -> defining source
        self.functions: list[str] = []        # function sources, callees first
        self.seen: dict[int, str] = {}        # id(py_func) -> its name in the module
        self.code_functions = False           # some function travels as bytecode

    def fail(self, message: str) -> NoReturn:
        raise UnsupportedError(f"kernel {self.kernel}: {message} ({HINT})")

    def add(self, fn: types.FunctionType, device: bool) -> str:
        if id(fn) in self.seen:
            return self.seen[id(fn)]
        what = f"{'device function' if device else 'kernel'} {fn.__qualname__}"
        own = fn.__name__ if fn.__name__.isidentifier() else f"_harp_lambda_{len(self.seen)}"
        if own in self.seen.values():
            self.fail(f"two functions it is built from are both named {own}; rename one")
        self.seen[id(fn)] = own
        namespace = self._namespace(fn)
        check_kernel_code(fn, namespace, "numba-python", what)
        for name, value in namespace.items():
            self._bind(name, value, what)
        if own != fn.__name__:     # a lambda: no `def` to take the source of
            self.functions.append(self._code_function(fn, own, device, what))
        else:
            self.functions.append(self._function_source(fn, device, what))
        return own

    def _namespace(self, fn: types.FunctionType) -> dict[str, Any]:
        namespace: dict[str, Any] = {}
        if fn.__closure__:
            for name, cell in zip(fn.__code__.co_freevars, fn.__closure__):
                try:
                    namespace[name] = cell.cell_contents
                except ValueError:
                    self.fail(f"closure variable {name} of {fn.__qualname__} is not set")
        for name in global_names(fn.__code__):
            if name in fn.__globals__:
                namespace.setdefault(name, fn.__globals__[name])
        return namespace

    def _bind(self, name: str, value: Any, what: str) -> None:
        if name in self.values:
            old = self.values[name]
            if old is value or (type(old) is type(value) and _same(old, value)):
                return
            self.fail(f"the global name {name!r} means different things in the functions it "
                      "is built from; rename one")
        if _callable_on_device(value):
            # numba compiles a kernel, or a CPU-jitted function, called from a kernel as a
            # device function
            real = self.add(value.py_func, device=True)
            self.values[name] = value
            if real != name:
                self.lines[name] = f"{name} = {real}"
            return
        if isinstance(value, KernelOnly):
            return   # check_kernel_code has refused it already
        self.values[name] = value
        line = self._define(name, value, what)
        if line is not None:
            self.lines[name] = line

    def _define(self, name: str, value: Any, what: str) -> str | None:
        if getattr(value, "__harp_shim__", False):
            return f"from numba import cuda as {name}"
        if isinstance(value, types.ModuleType):
            if value.__name__ == "__main__":
                self.fail(f"{what} reads the module __main__ ({name}), which the device "
                          "cannot import")
            return f"import {value.__name__} as {name}"
        literal = _literal(value)
        if literal is not None:
            return f"{name} = {literal}"
        if isinstance(value, type) and issubclass(value, BaseException) and \
                getattr(builtins, value.__name__, None) is not value:
            # the program's own exception class: a stand-in of the same name on the device,
            # raised in the program as the class itself (kernelerrors)
            register(value)
            base = next(c for c in value.__mro__ if getattr(builtins, c.__name__, None) is c)
            return f"{name} = type({value.__name__!r}, ({base.__name__},), {{}})"
        if isinstance(value, enum.EnumMeta) and _enum(value) is not None:
            return f"{name} = {_enum(value)}"
        if isinstance(value, types.FunctionType):
            self.fail(f"{what} calls the plain Python function {value.__qualname__} ({name}); "
                      "decorate it with @cuda.jit(device=True)")
        ref = _importable(value)
        if ref is not None:
            module, attr = ref
            return f"from {module} import {attr} as {name}"
        self.fail(f"{what} reads the global {name!r}, a {type(value).__name__}, which cannot "
                  "be sent to the device (numbers, strings, tuples, NumPy arrays up to "
                  f"{MAX_GLOBAL_ARRAY} bytes, modules and numba/NumPy types can)")
        return None

    def _function_source(self, fn: types.FunctionType, device: bool, what: str) -> str:
        try:
            raw = inspect.getsource(fn)
        except (OSError, TypeError):
            return self._code_function(fn, fn.__name__, device, what)
        text = textwrap.dedent(raw)
        try:
            tree = ast.parse(text)
        except SyntaxError as exc:
            self.fail(f"the source of {what} does not parse on its own: {exc}")
        node = tree.body[0] if tree.body else None
        if not isinstance(node, ast.FunctionDef) or node.name != fn.__name__:
            self.fail(f"the source of {what} is not a plain `def {fn.__name__}`")
        body = "\n".join(text.splitlines()[node.lineno - 1:])
        decorator = "@" + self._decorator(device)
        return f"{decorator}\n{body}\n"

    def _decorator(self, device: bool) -> str:
        if device:
            return f"{_CUDA}.jit(device=True)"
        return f"{_CUDA}.jit(debug=True)" if self.debug else f"{_CUDA}.jit"

    def _code_function(self, fn: types.FunctionType, name: str, device: bool, what: str) -> str:
        """A function with no source file (`exec`, `python -c`, an interactive session):
        its compiled code object instead, marshalled, rebuilt on the device over the
        module's globals. Marshal's format is the Python version's own, so the device
        checks that it runs the same version."""
        defaults = _literal(fn.__defaults__) if fn.__defaults__ else "None"
        if defaults is None:
            self.fail(f"{what} has default argument values that cannot be sent to the device")
        if fn.__kwdefaults__:
            self.fail(f"{what} has keyword-only default values, which numba does not take")
        self.code_functions = True
        code = marshal.dumps(fn.__code__).hex()
        decorator = self._decorator(device)
        return (f"{name} = {decorator}({_CODE_FUNCTION}({code!r}, {name!r}, "
                f"{defaults}, {tuple(sys.version_info[:2])!r}))\n")

    def render(self) -> str:
        for name, value in self.values.items():
            if name in self.seen.values() and not (
                    _callable_on_device(value) and value.py_func.__name__ == name):
                self.fail(f"the global name {name!r} is also the name of a device function it "
                          "calls; rename one")
        header = [f"# numba-python module generated by HARP for kernel {self.kernel}",
                  f"from numba import cuda as {_CUDA}"]
        if self.code_functions:
            header.append(CODE_FUNCTION_SOURCE)
        # aliases of device functions go after the functions they name
        plain = [line for n, line in self.lines.items()
                 if not _callable_on_device(self.values[n])]
        aliases = [line for n, line in self.lines.items()
                   if _callable_on_device(self.values[n])]
        return "\n".join(header + plain) + "\n\n\n" + "\n\n".join(self.functions) + \
            ("\n" + "\n".join(aliases) + "\n" if aliases else "")


def _callable_on_device(value: Any) -> bool:
    """A device function, a kernel, or numba's CPU `@jit` function: kernels may call them."""
    if isinstance(value, (DeviceFunction, Dispatcher)):
        return True
    return type(value).__name__ == "CPUDispatcher" and \
        type(value).__module__.startswith("numba.") and hasattr(value, "py_func")


def _enum(value: type) -> str | None:
    """Source that rebuilds an Enum class of plain values, or None."""
    members = [(m.name, _literal(m.value)) for m in value]
    if any(v is None for _, v in members):
        return None
    base = "IntEnum" if issubclass(value, enum.IntEnum) else "Enum"
    pairs = ", ".join(f"({n!r}, {v})" for n, v in members)
    return f"__import__('enum').{base}({value.__name__!r}, [{pairs}])"


def _same(a: Any, b: Any) -> bool:
    try:
        if isinstance(a, np.ndarray):
            return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))
        return bool(a == b)
    except Exception:
        return False


def _float(x: float) -> str:
    return repr(x) if np.isfinite(x) else f"float.fromhex({float(x).hex()!r})"


def _literal(value: Any) -> str | None:
    """Python source that rebuilds `value`, or None if it is not a plain constant."""
    if value is None or isinstance(value, (bool, int, str, bytes)):
        return repr(value)
    if isinstance(value, float):
        return _float(value)
    if isinstance(value, complex):
        return f"complex({_float(value.real)}, {_float(value.imag)})"
    if isinstance(value, np.generic) and value.dtype.kind in "biufc":
        name = value.dtype.name
        if value.dtype.kind == "f":
            return f"__import__('numpy').{name}({_float(float(value))})"
        if value.dtype.kind == "c":
            return f"__import__('numpy').{name}({_literal(complex(value))})"
        return f"__import__('numpy').{name}({value.item()!r})"
    if isinstance(value, np.dtype) and value.kind in "biufc":
        return f"__import__('numpy').dtype({value.str!r})"
    if isinstance(value, tuple):
        parts = [_literal(v) for v in value]
        if any(p is None for p in parts):
            return None
        return "(" + "".join(p + ", " for p in parts) + ")"
    if isinstance(value, np.ndarray) and not value.dtype.hasobject and \
            value.nbytes <= MAX_GLOBAL_ARRAY:
        data = np.ascontiguousarray(value).tobytes().hex()
        dtype = dtype_literal(value.dtype, "__import__('numpy')")
        return (f"__import__('numpy').frombuffer(bytes.fromhex({data!r}), "
                f"dtype={dtype}).reshape({value.shape!r}).copy()")
    if isinstance(value, np.generic) and not value.dtype.hasobject:   # records, datetimes
        data = value.tobytes().hex()
        dtype = dtype_literal(value.dtype, "__import__('numpy')")
        return f"__import__('numpy').frombuffer(bytes.fromhex({data!r}), dtype={dtype})[0]"
    return None


def _importable(value: Any) -> tuple[str, str] | None:
    """(module, attribute) from which the device can import `value` itself, if any."""
    try:
        import numba.core.types as nbtypes
        if isinstance(value, nbtypes.Type):
            import numba
            for attr in dir(numba.types):
                if not attr.startswith("_") and getattr(numba.types, attr, None) is value:
                    return "numba.types", attr
            return None
    except ImportError:   # pragma: no cover - numba is there whenever kernels are
        pass
    name = getattr(value, "__name__", None)
    if not isinstance(name, str):
        return None
    candidates = [getattr(value, "__module__", None), "numpy", "math", "cmath", "operator"]
    for module in candidates:
        if not isinstance(module, str) or module == "__main__":
            continue
        if module.startswith(("numba.cuda", "harp")):
            continue
        try:
            mod = importlib.import_module(module)
        except Exception:
            continue
        if getattr(mod, name, None) is value:
            return module, name
    if getattr(builtins, name, None) is value:
        return "builtins", name
    return None
