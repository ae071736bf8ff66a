"""PyTorch operators on a cuda session's own device memory: the cuda backend's `aten`.

The calls are checked and run by the backend-neutral `harp.backends.aten` (the
allow-list, the template, the device rule, output sizes on `meta`, the session's
generator, result copies, errors naming the operator); this module is what is
the cuda backend's own:

- **Tensors over the session's buffers, no copy.** Each array argument is checked
  against its real allocation (`kernels.check_array`, as for compiled kernels;
  torch takes no negative strides, and DLPack would abort the process on one, so
  those are refused first), made a CuPy array over that range of the buffer
  (`cupy.ndarray(..., memptr=...)`) and handed to torch by DLPack
  (`torch.from_dlpack`): a tensor on `cuda:N` whose storage is the buffer.
- **On the session's stream.** The operator and its result copies run with torch's
  current stream set to the HARP stream's own CUDA stream
  (`torch.cuda.ExternalStream` over the CuPy stream's handle), so they are ordered
  with the session's other calls on it; the launch holds the compute gate and is
  charged its CUDA-event time like any cuda launch (`CudaDevice._launch`).
- **Randomness** from a per-session `torch.Generator` on the GPU, seeded as on the
  host path (torch's CUDA generator: its numbers are not the CPU's).
- **Torch's own memory.** An operator's temporaries come from torch's caching
  allocator, not from the session's account: they are not under its quota. They
  are bounded per process with `torch.cuda.set_per_process_memory_fraction`, at
  the largest memory a session of this process may hold (on a pool server each
  session has a worker process of its own, so that is its own quota).

Which torch device that is comes from the driver: CuPy's memory is GPU memory, so
`aten` needs torch with CUDA (`torch.cuda.is_available()`). A driver whose
"device" memory is host memory says so (`HARP_HOST_MEMORY = True`: the tests'
stand-in for CuPy); DLPack then gives CPU tensors over it, no CUDA stream exists,
and torch's CPU build runs the same path, every line of it but the stream, the
CUDA generator and the memory bound.

**Not yet run on a GPU**: the GPU lines follow torch's documented CUDA API and are
exercised by `tests/backends/test_cuda_gpu.py` where a GPU is present.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable

import numpy as np

from ... import catalog
from ...errors import ArgumentError
from ...frontend import check_count
from ...types import ArrayArg, Buffer, Scalar
from ..aten import AtenCall, TorchPlace, torch_available
from . import kernels
from .card import CudaCard, DeviceMemory
from .streams import StreamState

_lock = threading.Lock()
#: Per driver (by id, the driver held so that its id stays its own): why not, or None.
_unavailable: dict[int, tuple[Any, str | None]] = {}
#: Per driver and GPU index: the place its sessions' calls run (the driver held, as above).
_places: dict[tuple[int, int], tuple[Any, "GpuPlace | HostPlace"]] = {}


def host_memory(cupy: Any) -> bool:
    """Whether the driver's device memory is host memory (the tests' stand-in for CuPy)."""
    return getattr(cupy, "HARP_HOST_MEMORY", False) is True


def unavailable(cupy: Any) -> str | None:
    """Why sessions over this driver cannot run `aten` calls here, or None when they can
    (torch with CUDA for GPU memory; torch itself for host memory). Asked once per
    driver and process."""
    key = id(cupy)
    with _lock:
        if key in _unavailable:
            return _unavailable[key][1]
    why = _why_not(cupy)
    with _lock:
        _unavailable[key] = (cupy, why)
    return why


def _why_not(cupy: Any) -> str | None:
    if not torch_available():
        return "torch is not installed (pip install 'harp[torch]')"
    if host_memory(cupy):
        return None
    try:
        import torch
        if torch.cuda.is_available():
            return None
    except Exception as exc:        # a broken torch install: say so, never fail the device
        return f"torch does not load: {type(exc).__name__}: {exc}"
    return "torch here has no usable CUDA (a CPU build, or a driver it cannot use)"


class GpuPlace(TorchPlace):
    """Torch on one GPU of this process: the generator, the streams and the memory bound
    of the `aten` calls of every session on it."""

    def __init__(self, torch: Any, index: int) -> None:
        torch.cuda.init()            # torch's CUDA state (default generators) exists from here
        super().__init__(torch, torch.device("cuda", index))
        self._streams: dict[int, Any] = {}
        self._bound = 0
        self._total = int(torch.cuda.get_device_properties(self.device).total_memory)

    def default_generator(self) -> Any:
        return self.torch.cuda.default_generators[self.device.index]

    def bound(self, nbytes: int) -> None:
        """Let torch's caching allocator hold at most `nbytes` on this GPU in this process
        (the largest any session here asked for: never less than one session's quota)."""
        with _lock:
            if nbytes <= self._bound:
                return
            self._bound = nbytes
        fraction = min(1.0, max(nbytes, 1) / self._total)
        self.torch.cuda.set_per_process_memory_fraction(fraction, self.device)

    def running(self, stream: Any) -> Any:
        """A context in which torch's current stream is `stream` (a CuPy stream)."""
        torch = self.torch
        external = self._streams.get(stream.ptr)
        if external is None:
            if len(self._streams) >= 4096:
                self._streams.clear()
            external = self._streams[stream.ptr] = torch.cuda.ExternalStream(
                stream.ptr, device=self.device)
        return torch.cuda.stream(external)


class HostPlace(TorchPlace):
    """Torch on the CPU over a driver whose device memory is host memory: work the driver
    issues runs as it is issued, so there is no stream to follow and nothing to bound."""

    def bound(self, nbytes: int) -> None:
        pass

    def running(self, stream: Any) -> Any:
        return contextlib.nullcontext()


def place_for(card: CudaCard, memory: int) -> "GpuPlace | HostPlace":
    """Where the `aten` calls of a session of `memory` bytes on `card` run (one place per
    card and process), with torch's own memory there bounded for it."""
    import torch
    key = (id(card.cp), card.index)
    with _lock:
        known = _places.get(key)
    if known is None:
        made = HostPlace(torch, torch.device("cpu")) if host_memory(card.cp) \
            else GpuPlace(torch, card.index)
        with _lock:
            known = _places.setdefault(key, (card.cp, made))
    place = known[1]
    place.bound(memory)
    return place


class AtenKernel:
    """An `aten` call as a cuda session's function-table entry: its launch arguments made
    tensors over the session's buffers, and its run on the launch's stream."""

    __slots__ = ("call", "place", "cp")

    def __init__(self, call: AtenCall, place: "GpuPlace | HostPlace", cp: Any) -> None:
        self.call, self.place, self.cp = call, place, cp

    def prepare(self, args: list, memory: Callable[[Buffer], DeviceMemory]) -> list:
        """The launch's arguments as the call takes them, checked (call with the GPU
        current): arrays as tensors over their buffers, scalars as NumPy scalars."""
        values: list = []
        for i, arg in enumerate(args):
            if isinstance(arg, ArrayArg):
                values.append(self._tensor(i, memory(arg.buffer), arg))
            elif isinstance(arg, Scalar):
                values.append(catalog.scalar_value(arg.value, arg.dtype))
            else:
                raise ArgumentError(f"{self.call.name}: launch argument {i} must be an array "
                                    "or a scalar")
        return self.call.prepare(values)

    def _tensor(self, i: int, mem: DeviceMemory, arg: ArrayArg) -> Any:
        """A tensor over the array's range of its buffer, checked against the allocation."""
        torch = self.place.torch
        dtype = np.dtype(arg.dtype)
        self.call.check_dtype(dtype)
        offset = check_count(arg.offset, "array offset")
        strides = kernels.check_array(mem.size, offset, dtype, arg.shape, arg.strides)
        if any(s < 0 for s in strides):
            raise ArgumentError(f"{self.call.name}: launch argument {i} has negative strides, "
                                "which torch does not take")
        try:
            if mem.owner is None or 0 in arg.shape:     # no elements: no memory to share
                return torch.empty_strided(arg.shape, [s // dtype.itemsize for s in strides],
                                           dtype=getattr(torch, dtype.name),
                                           device=self.place.device)
            array = self.cp.ndarray(arg.shape, dtype, memptr=mem.owner + offset,
                                    strides=strides)
            return torch.from_dlpack(array)
        except (TypeError, ValueError, OverflowError, RuntimeError, BufferError) as exc:
            raise ArgumentError(f"{self.call.name}: launch argument {i}: "
                                f"{type(exc).__name__}: {exc}") from None

    def run(self, state: StreamState, values: list) -> None:
        """Run the call on the stream (its failure: a `DeviceError` naming the operator)."""
        try:
            with self.place.running(state.stream):
                self.call.run((1, 1, 1), (1, 1, 1), 0, values)
        finally:
            state.issued()          # whatever torch queued before a failure is on the stream
