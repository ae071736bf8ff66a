"""The module object programs get as `numba.cuda` under `harp run`."""
from __future__ import annotations

import threading
import types
from typing import Any

from . import api, streams, submodules
from .devicearray import DeviceNDArray
from .dispatcher import In, InOut, Out, jit
from .errors import Unsupported, UnsupportedAttributeError
from .reduction import Reduce
from .intrinsics import TYPE_NAMES, VECTOR_TYPE, KernelOnly, intrinsic_names

#: Host API the shim provides.
SUPPORTED = {
    "jit": jit,
    "to_device": api.to_device,
    "device_array": api.device_array,
    "device_array_like": api.device_array_like,
    "is_cuda_array": api.is_cuda_array,
    "Reduce": Reduce,
    "reduce": Reduce,
    "pinned": api.pinned,
    "pinned_array": api.pinned_array,
    "pinned_array_like": api.pinned_array_like,
    "mapped_array": api.mapped_array,
    "mapped_array_like": api.mapped_array_like,
    "DeviceNDArray": DeviceNDArray,
    "In": In, "Out": Out, "InOut": InOut,
    "stream": streams.stream,
    "default_stream": streams.default_stream,
    "legacy_default_stream": streams.legacy_default_stream,
    "per_thread_default_stream": streams.per_thread_default_stream,
    "event": streams.event,
    "event_elapsed_time": streams.event_elapsed_time,
    "synchronize": api.synchronize,
    "is_available": api.is_available,
    "detect": api.detect,
    "get_current_device": api.get_current_device,
    "select_device": api.select_device,
    "list_devices": api.list_devices,
    "current_context": api.current_context,
    "close": api.close,
}

#: numba.cuda APIs that HARP does not provide, and why (each raises UnsupportedError when used).
UNSUPPORTED = {
    "mapped": "mapped host memory would have kernels read this host's memory",
    "managed_array": "managed (unified) memory would have kernels read this host's memory",
    "gpus": "a process has one HARP device (use cuda.get_current_device())",
    "external_stream": "a raw CUDA stream of this process means nothing to a HARP device",
    "as_cuda_array": "foreign CUDA arrays are not on the HARP device",
    "from_cuda_array_interface": "foreign CUDA arrays are not on the HARP device",
    "open_ipc_array": "CUDA IPC needs a local GPU",
    "vectorize": "cuda.vectorize (write the ufunc as a kernel)",
    "guvectorize": "cuda.guvectorize (write the gufunc as a kernel)",
    "declare_device": "declaring external device functions needs linking (link=)",
    "compile": "compiling by hand (kernels compile when launched)",
    "compile_ptx": "compiling by hand (kernels compile when launched; kernel.inspect_asm() "
                   "gives their PTX)",
    "compile_ptx_for_current_device": "compiling by hand (kernel.inspect_asm() gives PTX)",
    "compile_for_current_device": "compiling by hand (kernels compile when launched)",
    "compile_all": "compiling by hand (kernels compile when launched)",
    "set_memory_manager": "a HARP device manages its own memory",
    "defer_cleanup": "HARP frees device memory on its own schedule",
    "profile_start": "profiling hooks of the CUDA driver (use `harp run --trace`)",
    "profile_stop": "profiling hooks of the CUDA driver (use `harp run --trace`)",
    "profiling": "profiling hooks of the CUDA driver (use `harp run --trace`)",
    "require_context": "driver contexts (HARP attaches on first use)",
    "driver": "the CUDA driver of this process (there is none: the device is HARP's)",
    "runtime": "the CUDA runtime of this process (there is none: the device is HARP's)",
    "cudadrv": "the CUDA driver layer of this process (there is none: the device is HARP's)",
    "cg": "cooperative groups",
}


class ShimModule(types.ModuleType):
    """`numba.cuda` as HARP gives it: the supported API, kernel-only intrinsics, numba's types,
    and a named `UnsupportedError` for the rest."""

    __harp_shim__ = True

    def __getattr__(self, name: str) -> Any:
        if name in TYPE_NAMES:
            import numba
            value = getattr(numba.types, name, None)
            if value is not None:
                return value
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(f"module 'numba.cuda' has no attribute {name!r}")
        if name == "random":
            from . import rng
            value = self.__dict__["random"] = rng.module()
            return value
        if name in submodules.PURE_ATTRIBUTES or name in submodules.PURE_SUBMODULES or \
                VECTOR_TYPE.match(name):
            value = submodules.real_attribute(name)
            self.__dict__[name] = value
            return value
        if name in submodules.REFUSED_SUBMODULES or submodules.exists(name):
            raise UnsupportedAttributeError(missing(name))
        raise AttributeError(missing(name))

    def __setattr__(self, name: str, value: Any) -> None:
        # The import system records each real numba.cuda submodule that HARP itself loads
        # (e.g. the simulator for a local cpu device) on its parent: not on the shim.
        if isinstance(value, types.ModuleType) and value.__name__.startswith("numba.cuda."):
            return
        super().__setattr__(name, value)


def missing(name: str) -> str:
    """Why numba.cuda.`name` is not there under HARP: not provided, or not numba's at all."""
    if name in submodules.REFUSED_SUBMODULES:
        return f"numba.cuda.{name} is not supported under HARP: " + \
            submodules.REFUSED_SUBMODULES[name]
    if submodules.exists(name):
        return (f"numba.cuda.{name} is not supported under HARP: HARP's numba.cuda does not "
                "provide it, being neither HARP's own API nor one of numba's device-free "
                "parts that HARP passes through")
    return f"module 'numba.cuda' has no attribute {name!r} (nor has numba's own numba.cuda)"


_MODULE: list[ShimModule] = []
_LOCK = threading.Lock()


def module() -> ShimModule:
    """The one `numba.cuda` stand-in of this process (made on first use)."""
    if _MODULE:
        return _MODULE[0]
    with _LOCK:
        if not _MODULE:
            from .doc import TEXT as doc
            mod = ShimModule("numba.cuda", doc)
            mod.__dict__.update(SUPPORTED)
            for name in intrinsic_names():
                if name not in UNSUPPORTED:
                    mod.__dict__[name] = KernelOnly(name)
            for name, why in UNSUPPORTED.items():
                mod.__dict__[name] = Unsupported(f"numba.cuda.{name}", why)
            mod.__path__ = []       # a package: submodule imports reach HARP's finder
            mod.__package__ = "numba.cuda"
            _MODULE.append(mod)
    return _MODULE[0]
