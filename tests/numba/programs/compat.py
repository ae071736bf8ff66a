"""What numba's own test suite asks of numba.cuda beyond the common programs: one line per
behaviour, "name: result", the same in Numba's simulator and under harp run. Lines that start
with "harp " are HARP's alone (what it refuses, and why)."""
import math
from collections import namedtuple

import numpy as np
from numba import cuda, float32, float64, int32, void
from numba.cuda import HAS_NUMBA, config                     # attributes, not submodules
from numba.cuda.core import config as core_config            # numba's own, device-free
from numba.cuda.core.errors import TypingError               # noqa: F401
from numba.cuda.random import create_xoroshiro128p_states, xoroshiro128p_uniform_float32


class UserError(Exception):
    pass


def show(name, value):
    print(f"{name}: {value}")


# -- numba.cuda's own attributes and device-free submodules ------------------------------
show("attributes", f"{HAS_NUMBA} {config is core_config} {type(config.ENABLE_CUDASIM)}")

# -- a kernel made by exec() has no source file ---------------------------------------------
namespace = {"cuda": cuda}
exec("def made_by_exec(a):\n    i = cuda.grid(1)\n    if i < a.size:\n        a[i] = i * 3\n",
     namespace)
exec_kernel = cuda.jit(namespace["made_by_exec"])
a = np.zeros(4)
exec_kernel[1, 4](a)
show("exec kernel", a.tolist())


# -- scalars typed as numba types Python values ---------------------------------------------
@cuda.jit
def is_true(out, flag):
    out[0] = 1 if flag is True else 2


out = np.zeros(1)
is_true[1, 1](out, True)
show("python True", out[0])


@cuda.jit(void(float32[:], float32, int32))
def ldexp(out, x, e):
    out[0] = math.ldexp(x, e)


f = np.zeros(1, np.float32)
ldexp[1, 1](f, 0.785375, 2)
show("python int to ldexp", f"{f[0]:.4f}")


@cuda.jit([void(float32[:], float32, float32), void(float64[:], float64, float64)])
def add_f(out, x, y):
    out[0] = x + y


r64 = np.zeros(1)
add_f[1, 1](r64, 0.1, 0.2)
show("python floats pick f64", f"{r64[0]!r}")

# -- launch configurations are checked as numba checks them --------------------------------
try:
    add_f[2.0, 3]
except TypeError as e:
    show("float griddim", f"TypeError {e}")
try:
    cuda.jit(ldexp.py_func)(f, 1.0, 2)
except ValueError as e:
    show("no launch configuration", "launch configuration was not specified" in str(e))


# -- a kernel's exception is raised as its own type ----------------------------------------
@cuda.jit(debug=True, opt=False)
def raises_value_error(do_raise):
    if do_raise:
        raise ValueError("raised in the kernel")


raises_value_error[1, 1](False)
try:
    raises_value_error[1, 1](True)
    show("debug kernel exception", "not raised")
except ValueError as e:
    show("debug kernel exception", f"ValueError {str(e).split(': ')[-1]}")


@cuda.jit
def raises_user_error(a):
    if cuda.grid(1) == 1:
        raise UserError("the program's own class")


d = cuda.to_device(np.zeros(2))
try:
    raises_user_error[1, 2](d)      # raised at the launch in the simulator, at the sync in HARP
    cuda.synchronize()
    show("user exception", "not raised")
except UserError as e:
    show("user exception", f"UserError {str(e).split(': ')[-1]}")


# -- arguments a launch packs: complex, tuples, namedtuples, records, non-numeric arrays ----
@cuda.jit
def complex_args(out, z, w):
    out[0] = z.real + w.imag
    out[1] = (z * w).real


r = np.zeros(2)
complex_args[1, 1](r, 1 + 2j, np.complex64(3 - 4j))
show("complex arguments", r.tolist())

Point = namedtuple("Point", ("x", "y"))


@cuda.jit
def tuple_args(out, t, p):
    out[0] = t[0] + t[1][0]
    out[1] = p.x * p.y


tuple_args[1, 1](r, (1.5, (2, 3)), Point(3, 4))
show("tuple arguments", r.tolist())

record = np.dtype([("a", np.int32), ("b", np.float64)], align=True)


@cuda.jit
def record_args(arr, rec):
    i = cuda.grid(1)
    if i < arr.size:
        arr[i]["b"] = arr[i]["a"] * 2 + rec["b"]


arr = np.zeros(3, record)
arr["a"] = [1, 2, 3]
one = np.zeros(1, record)[0]
one["b"] = 0.5
record_args[1, 4](arr, one)
show("record arguments", arr["b"].tolist())


@cuda.jit
def string_and_dates(out, s, dates):
    out[0] = len(s[1])
    out[1] = (dates[1] - dates[0]).astype(np.int64)


o = np.zeros(2, np.int64)
string_and_dates[1, 1](o, np.array([b"a", b"xyz"], "S3"),
                       np.array(["2020-01-01", "2021-01-01"], "datetime64[D]"))
show("string and datetime arrays", o.tolist())


# -- numba.cuda APIs the suite uses --------------------------------------------------------
total = cuda.Reduce(lambda x, y: x + y)
show("cuda.Reduce", f"{total(np.arange(10.0) + 1)} {total(np.arange(4.0), init=3)}")


@cuda.jit
def callee(a, i):
    a[i] = i * 2


@cuda.jit
def caller(a):
    i = cuda.grid(1)
    if i < a.size:
        callee(a, i)


a = np.zeros(4)
caller[1, 4](a)
show("kernel called from a kernel", a.tolist())


class DefaultIn:
    def prepare_args(self, ty, val, **kwargs):
        return ty, cuda.In(val) if isinstance(val, np.ndarray) else val


def set_twice(a, i):
    a[i] = i * 2


no_copy_back = cuda.jit(set_twice)
no_copy_back.extensions.append(DefaultIn())
a = np.zeros(2)
no_copy_back[1, 1](a, 1)
show("extensions", a.tolist())
@cuda.jit
def uniform(states, out):
    i = cuda.grid(1)
    if i < out.size:
        out[i] = xoroshiro128p_uniform_float32(states, i)


numbers = np.zeros(4, np.float32)
uniform[1, 4](create_xoroshiro128p_states(4, seed=1), numbers)
show("numba.cuda.random", " ".join(f"{x:.6f}" for x in numbers))
ptd = cuda.per_thread_default_stream()
on_ptd = cuda.to_device(np.zeros(4), stream=ptd)
caller[1, 4, ptd](on_ptd)
ptd.synchronize()
show("per-thread default stream", on_ptd.copy_to_host().tolist())
show("pinned and mapped arrays",
     f"{cuda.pinned_array_like(a).shape} {cuda.mapped_array((2,), np.int32).dtype}")

if type(cuda).__name__ == "ShimModule":
    for code in ("numba.cuda.gpus[0]", "from numba.cuda import no_such_name",
                 "numba.cuda.devicearray"):
        try:
            exec(code, {"numba": __import__("numba")})
        except ImportError as e:
            show(f"harp {code}", f"ImportError {e}")
        except Exception as e:
            show(f"harp {code}", f"{type(e).__name__} {e}")
show("device_array_like of a view", cuda.device_array_like(
    cuda.device_array((10, 12), order="F")[::2, ::2]).strides)
