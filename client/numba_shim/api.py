"""The host-side API of HARP's numba.cuda: memory, devices, synchronization."""
from __future__ import annotations

import contextlib
import sys
import warnings
from collections import namedtuple
from typing import Any, Iterator

import numpy as np

from harp.errors import HarpError

from .devicearray import DeviceNDArray, new_array
from .devicearray import to_device as _to_device
from .errors import UnsupportedAttributeError, unsupported
from .session import close_current, current

MemoryInfo = namedtuple("MemoryInfo", "free,total")

#: numba's simulator reports this compute capability; HARP reports it for devices that
#: run kernels in the simulator (cpu devices) and report none of their own.
SIMULATOR_CC = (5, 2)


def to_device(obj: Any, stream: Any = 0, copy: bool = True, to: Any = None) -> DeviceNDArray:
    """Copy a host array to the device: a new device array (or into `to`)."""
    return _to_device(obj, stream=stream, copy=copy, to=to)


def device_array(shape: Any, dtype: Any = np.float64, strides: Any = None, order: str = "C",
                 stream: Any = 0) -> DeviceNDArray:
    """A device array (zeroed on HARP devices that clear memory, undefined otherwise)."""
    return new_array(shape, dtype, strides=strides, order=order, stream=stream)


def device_array_like(ary: Any, stream: Any = 0) -> DeviceNDArray:
    """A contiguous device array with `ary`'s shape and dtype, its axes in the order of
    `ary`'s strides (NumPy's `empty_like`, as numba's simulator does: the F-order view of
    an F-order array gives an F-order array)."""
    shape, dtype = tuple(ary.shape), np.dtype(ary.dtype)
    strides = getattr(ary, "strides", None)
    if strides is None or not shape:
        return new_array(shape, dtype, stream=stream)
    # NumPy's layout rule, on a view that reads no memory (one element, any strides)
    model = np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape, tuple(strides))
    return new_array(shape, dtype, strides=np.empty_like(model).strides, stream=stream)


# -- host memory -------------------------------------------------------------------
# Page-locked (pinned) and mapped host memory are ways a local GPU reaches host memory
# faster or directly. A HARP device is reached through its session: these give plain
# NumPy arrays, which behave as numba's do for a program (a kernel launched with a host
# array copies it to the device and back, as numba does with mapped memory's contents).

def pinned_array(shape: Any, dtype: Any = np.float64, strides: Any = None,
                 order: str = "C") -> np.ndarray:
    """numba's `cuda.pinned_array`: a host array (HARP has no page-locked memory to give)."""
    return np.ndarray(shape, dtype, strides=strides, order=order)


def pinned_array_like(ary: Any) -> np.ndarray:
    """numba's `cuda.pinned_array_like`: a host array shaped as `ary`."""
    return np.empty_like(np.asarray(ary))


@contextlib.contextmanager
def pinned(*arylist: Any) -> Iterator[None]:
    """numba's `with cuda.pinned(ary, ...)`: page-locks nothing (see above); the arrays are
    used as they are."""
    yield


def mapped_array(shape: Any, dtype: Any = np.float64, strides: Any = None, order: str = "C",
                 stream: Any = 0, portable: bool = False, wc: bool = False) -> np.ndarray:
    """numba's `cuda.mapped_array`: a host array; a kernel launched with it gets it copied
    in and back, so the host sees what the kernel wrote once the launch returns."""
    return np.ndarray(shape, dtype, strides=strides, order=order)


def mapped_array_like(ary: Any, stream: Any = 0, portable: bool = False,
                      wc: bool = False) -> np.ndarray:
    """numba's `cuda.mapped_array_like`: a host array shaped as `ary` (see `mapped_array`)."""
    return np.empty_like(np.asarray(ary))


def is_cuda_array(obj: Any) -> bool:
    """Whether `obj` is a device array (of HARP's)."""
    return isinstance(obj, DeviceNDArray)


def synchronize() -> None:
    """Wait for all work on the device (every stream) and raise any deferred failure."""
    current().synchronize()


class Device:
    """numba's device object, for the HARP device this process is attached to."""

    id = 0

    def __init__(self, session: Any) -> None:
        info = session.info
        self._session = session
        self.info = info
        self.name = info.name
        self.compute_capability = info.compute_capability or SIMULATOR_CC
        self.uuid = f"HARP-{info.backend}-{info.index}"

    def reset(self) -> None:
        """End the session (frees everything); the next use attaches again."""
        close_current()

    def __getattr__(self, name: str) -> Any:
        extra = self.__dict__.get("info").extra if "info" in self.__dict__ else {}
        for key in (name, name.lower()):
            if key in extra:
                return extra[key]
        if name.startswith("__"):
            raise AttributeError(name)
        raise UnsupportedAttributeError(
            f"numba.cuda device attribute {name} is not reported by the HARP device "
            f"{self.name!r} (it reports: {', '.join(sorted(extra)) or 'nothing extra'})")

    def __repr__(self) -> str:
        return f"<HARP CUDA device {self.id} '{self.name}'>"


def get_current_device() -> Device:
    """The device this process runs on: the HARP device `harp run` attached."""
    return Device(current())


def select_device(device_id: int = 0) -> Device:
    """Select device 0, the HARP device; other ids are not supported."""
    if device_id != 0:
        unsupported(f"cuda.select_device({device_id})", "a process has one HARP device, "
                    "device 0 (lease several devices and run one process per device)")
    return get_current_device()


def list_devices() -> list[Device]:
    return [get_current_device()]


class Context:
    """numba's context object, for the HARP session."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self.device = Device(session)

    def get_memory_info(self) -> MemoryInfo:
        with self._session.lock:
            self._session.check_open()
            info = self._session.device.mem_info()
        return MemoryInfo(info.free, info.total)

    def synchronize(self) -> None:
        self._session.synchronize()

    def reset(self) -> None:
        close_current()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise UnsupportedAttributeError(f"numba.cuda context method {name} is not supported "
                                        "under HARP")


def current_context(devnum: int | None = None) -> Context:
    if devnum not in (None, 0):
        select_device(devnum)
    return Context(current())


def is_available() -> bool:
    """Whether this process can run kernels on its HARP device (attaching if need be)."""
    try:
        current().require_kernel_format()
    except HarpError as exc:
        warnings.warn(f"HARP device not available: {exc}", RuntimeWarning, stacklevel=2)
        return False
    return True


def detect() -> bool:
    """Print the HARP device, as numba's detect() prints the GPUs; True if kernels can run."""
    try:
        session = current()
    except HarpError as exc:
        print(f"HARP: no device: {exc}")
        return False
    info = session.info
    fmt = session.kernel_format
    print("Found 1 CUDA devices (HARP)")
    print(f"id 0    {info.name:>40} {'[SUPPORTED]' if fmt else '[NOT SUPPORTED]':>20}")
    cc = info.compute_capability or SIMULATOR_CC
    print(f"{'compute capability':>40}: {cc[0]}.{cc[1]}")
    print(f"{'HARP device':>40}: {session.target or '-'} ({info.kind}, {info.backend})")
    print(f"{'kernels as':>40}: {fmt or 'none'}")
    sys.stdout.flush()
    return fmt is not None


def close() -> None:
    """numba's `cuda.close()`: end this process's HARP session; the next use attaches again."""
    close_current()
