"""The documentation of HARP's numba.cuda (the shim package's docstring, and the
`numba.cuda` module's under `harp run`): what it provides and what it does not."""

TEXT = """HARP's `numba.cuda`: numba's CUDA API, served by a HARP device.

Under `harp run`, `from numba import cuda` gives a program this module instead
of numba's (see `harp.client.interpose`); `harp.client.numba_shim.module()`
gives it to code that asks for it directly. The device is opened on first use:
the one `harp run` names (`HARP_RUN_DEVICE`), else `harp.connect()`'s default
(`HARP_DEVICE`, or the stored lease); `use_device(dev)` picks an open device.

Kernels are compiled on the client, once per signature, and loaded once per
session: to PTX by numba for devices that accept "ptx" (for the device's
compute capability; no GPU is needed on the client), or sent as their source
("numba-python") to a cpu device that trusts client code, which runs them in
Numba's CUDA simulator.

Supported
- `@cuda.jit` kernels and `@cuda.jit(device=True)` device functions, with or
  without explicit signatures (picked as numba ranks them), lambdas, and functions
  made by `exec` or in `python -c` (sent as their code object: the device runs the
  same Python version); options debug (a debug kernel's exception is raised by its
  launch), lineinfo, fastmath, opt, forceinline, inline, launch_bounds, extensions
  (cache, max_registers, boundscheck and shared_memory_carveout are accepted and have
  no effect); `kernel.extensions`, `kernel.specialize(...)`
- launches `kernel[grid, block]`, `kernel[grid, block, stream]`,
  `kernel[grid, block, stream, dynamic_shared_bytes]`, `kernel.forall(n)`;
  arguments: device arrays, NumPy arrays (copied in and back, as numba does),
  `cuda.In/Out/InOut`, int/float/bool and NumPy scalars (typed as numba types them:
  a Python int is int64, a float float64, True a bool); on cpu devices also complex
  scalars, tuples and namedtuples, records (passed by reference), and arrays of
  record, string and datetime dtypes
- a kernel's exception (IndexError, `raise ValueError`, the program's own class) is
  raised as its own type at the next sync, chained to the `DeviceError` that names
  the launch
- inside kernels: threadIdx, blockIdx, blockDim, gridDim, grid, gridsize,
  warpsize, laneid, shared.array, local.array, const.array_like, atomic.*,
  syncthreads(_count/_and/_or), threadfence*, popc, brev, clz, ffs, fma, cbrt,
  selp, fp16, vector types, device functions, kernels and numba CPU `@jit`
  functions called as device functions, math/NumPy functions numba supports; on
  cpu devices cooperative groups (`cuda.cg`); on CUDA devices the warp intrinsics
  (shfl_*_sync, ballot_sync, ...), syncwarp, activemask, lanemask_lt, nanosleep,
  libdevice
- memory: `to_device`, `device_array`, `device_array_like`; device arrays with
  shape, dtype, strides, size, nbytes, ndim, `copy_to_host(ary=None, stream=0)`,
  `copy_to_device`, basic indexing and slicing (views over the same buffer; an
  element index reads the element), item/slice assignment, `split`, `reshape`,
  `ravel`, `squeeze`, `view`, `T`/`transpose` (a copy, as numba's), `bind`,
  `len`, `is_c_contiguous`, `is_f_contiguous`, `flags`, `np.asarray(d)`;
  `pinned_array(_like)`, `mapped_array(_like)` and `pinned(...)` give plain NumPy
  arrays (no page-locked memory; a kernel gets a mapped array copied in and back)
- `cuda.Reduce`/`cuda.reduce` (one device thread folds the array in order),
  `numba.cuda.random` (numba's xoroshiro128+ generators, states on the device)
- order: `cuda.stream()` (with numba's blocking-stream order against the legacy
  default stream), `default_stream()`, `legacy_default_stream()`,
  `per_thread_default_stream()` (a stream per host thread), `synchronize`,
  `auto_synchronize`; `cuda.event()` with record, wait, synchronize, query,
  elapsed_time; `cuda.event_elapsed_time`; `cuda.synchronize()`
- device facts: `is_available`, `detect`, `get_current_device()` (name,
  compute_capability — a cpu device reports the simulator's 5.2 —, id, uuid,
  reset), `select_device(0)`, `list_devices`, `current_context()`
  (`get_memory_info`, `synchronize`, `reset`), `close`
- numba's own device-free parts: `HAS_NUMBA`, `config`, the types, and imports of
  `numba.cuda.core.*`, `numba.cuda.types`, `numba.cuda.typing`, `numba.cuda.np`,
  `numba.cuda.extending`, `numba.cuda.launchconfig` and the like
  (`harp.client.numba_shim.submodules`); `CUSource` and the other linkable-code
  holders (linking them is refused)

Not supported (each raises `harp.UnsupportedError` naming the API and why)
- host memory the device would reach: `mapped(...)`, `managed_array`; raw pointers
  and foreign arrays: `__cuda_array_interface__`, `device_ctypes_pointer`,
  `as_cuda_array`, `from_cuda_array_interface`, `external_stream`, IPC
  (`get_ipc_handle`, `open_ipc_array`)
- several devices: `cuda.gpus`, `select_device(n)` for n > 0
- `link=`/`lto=`, `declare_device`, `vectorize`/`guvectorize`, the compile
  functions (`compile_ptx` & co; `kernel.inspect_asm()` gives PTX),
  `Stream.add_callback`, memory managers,
  `profile_start/stop`, `Dispatcher.overloads` and numba's other dispatcher
  internals, imports of the submodules that drive this process's own CUDA driver
  or numba's own launches (`numba.cuda.cudadrv`, `numba.cuda.dispatcher`,
  `numba.cuda.kernels`, ...; once numba's own numba.cuda is loaded, Python finds
  them loaded and the import is not refused, but they find no GPU)
- on CUDA devices: cooperative groups, complex, tuple and record arguments, arrays of
  record, string and datetime dtypes
- on cpu devices (Numba's simulator), what the simulator lacks: warp
  intrinsics, libdevice, `cuda.float32`-style types inside kernels, intrinsics
  imported by name (`from numba.cuda import grid`), `numba.cuda.X` through the
  numba package inside kernels
- `print()` inside kernels on a remote device (its output would appear on the pool
  server); it works on a device in this process (`harp run --device local:cpu`)
- fancy indexing of device arrays, object dtypes
- a session loads at most 1024 modules (one per kernel, and per layout of packed
  arguments) and cannot unload them: a process that makes more kernels than that
  fails with a `QuotaError`

Host arrays passed to `copy_to_host(stream=s)` are filled before it returns
(the copy is still ordered on `s`), and `Event.query()` waits for the event.
"""
