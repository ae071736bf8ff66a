"""NOT CuPy: a host-memory stand-in for the few CuPy APIs that harp.backends.cuda uses.

For tests on machines without a GPU only. Given to the cuda backend as its
driver (`load_backend("cuda", cupy=harp_fake_cupy)`, or `HARP_CUDA_CUPY=harp_fake_cupy`
with this directory's parent on the path), the backend reports one emulated GPU
and the conformance suite runs against `CudaDevice` (its `*-cuda-emulated` kinds):

    pytest tests/conformance -k cuda-emulated

"Device" memory is host memory, so a device pointer is a host address; every
copy, memset and catalog launch checks that its pointers fall inside live
allocations (catching out-of-range spans, use after free, destroyed streams),
new allocations are filled with garbage (so zeroing is checked), and catalog
kernels run the real catalog CUDA C in the host emulation of
`harp_cuda_emulation`. `ndarray` is an array over a device allocation (only the
constructor from a memory pointer, and DLPack), checked to lie inside it. Work runs synchronously when issued, so this checks
HARP's bookkeeping (sequence numbers, deferred errors, handles, accounting,
argument marshalling), not concurrency, and nothing about real GPUs or CuPy.
"""
from . import cuda  # noqa: F401
from .array import ndarray  # noqa: F401

__version__ = "0.0+harp.emulation"

#: What the cuda backend asks a driver it is given: this one's "device" memory is host
#: memory, so its arrays reach torch through DLPack as CPU tensors (torch's CPU build runs
#: the backend's `aten` calls on them), and no CUDA stream exists to run them on.
HARP_HOST_MEMORY = True
