"""`OpenclDevice`: one session on an OpenCL device; `OpenclCard`: the device as the
sessions of one process share it.

The card holds the device's one context, a service queue that zeroes new
buffers, the catalog program (built once, on first use) and the device's
limits. A session (a `BackendDevice`: numbering, handles, checks, quota, trust
and deferred errors are the base's) has one in-order command queue per stream,
with profiling on, and writes only the hooks:

- **Memory.** One `cl.Buffer` per allocation (a 0-byte one is backed by one
  byte), zeroed on the card's service queue before any command of any stream
  may touch it: every command that uses a buffer waits for its zeroing until
  that is seen done. An allocation above the device's `max_mem_alloc_size` is an
  `OutOfMemoryError`. Writes return at once and never hold on to the caller's
  data: on an idle queue they are done there and then (a blocking write), else
  the bytes go into a staging buffer the queue copies from (at most
  `MAX_STAGED_BYTES` of them outstanding per session; a write beyond waits for
  the oldest). Reads block after the queue's earlier work (a buffer is mapped
  and copied out once). A copy within one buffer whose ranges overlap goes
  through a temporary buffer (OpenCL refuses overlapping copies), so it behaves
  like memmove. Fills use a 16-byte pattern where they can (PoCL fills byte by
  byte several times slower).
- **Order.** A stream is a `cl.CommandQueue`; recording an event enqueues a
  marker, waiting on one a barrier on the other queue; an event never recorded
  is complete; `elapsed` is the difference of the markers' profiled end times.
  Every call is queued at once and nothing waits for the device to catch up
  (a remote client's calls arrive pipelined, and its worker must keep reading
  them for a close to be heard).
- **Close** does not wait for queued work. Every catalog kernel of a session
  first reads the session's cancel flag, a 4-byte buffer, and returns at once
  when it is set; close sets it, so the session's queued catalog kernels run
  as no-ops (those already running finish). Then it releases the queues and
  buffers: OpenCL keeps a released buffer until the commands queued on it are
  done, so no other session is handed memory that this one's work still
  touches. (Failing a user event that queued kernels wait on would drop them
  too, but PoCL 3.1 aborts the process when their events are released while
  earlier kernels still run.) Queued *client* kernels cannot be cancelled so:
  they run to the end after close (on a pool server the session's worker
  process exits with the session, and its queues with it).
- **Code.** The catalog (`programs.py`) runs with its NDRange chosen here;
  buffer offsets of catalog launches must be aligned to the element size. f64
  kernels exist only on a device with `cl_khr_fp64`. Client modules:
  `opencl-binary` (a program binary for this device, as clGetProgramInfo gives
  it) on any session; `opencl-source` (OpenCL C) only on a session that trusts
  client code. A client launch runs grid*block work-items per dimension in
  groups of block; a `BufferArg` at offset 0 is the buffer itself, at another
  offset a sub-buffer (the offset must be a multiple of the device's
  `mem_base_addr_align`); an `ArrayArg` is its data, as a `BufferArg`; a
  `Scalar` is a value of its dtype. The argument count is checked against the
  kernel's. `shared_mem` is refused: OpenCL local memory is a kernel parameter.
- **Errors.** Driver failures are `DeviceError`s (out of memory or resources:
  `OutOfMemoryError`); a command that failed on the device is reported, naming
  its call, at the next sync call that sees it.

Caveats: a client kernel runs in the server's context, like any OpenCL
program's, and is not isolated from other sessions' memory in the same process
(a pool server runs each session in a worker process of its own); on PoCL a
kernel that writes out of bounds, or a malformed program binary (PoCL asserts
on some), can take its process down.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Any

import numpy as np

from ... import catalog
from ...errors import ArgumentError, DeviceError, HarpError, OutOfMemoryError
from ...frontend import check_count
from ...types import ArrayArg, BufferArg, Scalar
from ..base import BackendDevice, CatalogSpan, Loaded
from . import programs

#: Most bytes of staged writes one session may have outstanding (a write beyond waits).
MAX_STAGED_BYTES = 64 << 20
#: OpenCL status codes of a device out of memory or resources: MEM_OBJECT_ALLOCATION_FAILURE,
#: OUT_OF_RESOURCES, OUT_OF_HOST_MEMORY.
OUT_OF_MEMORY_CODES = frozenset({-4, -5, -6})
#: Longest build log kept in an error.
MAX_LOG = 4000
#: Fills at least this long use a wide pattern for their aligned middle.
WIDE_FILL = 4096
_PATTERN = 16


def _cut(text: str, limit: int = MAX_LOG) -> str:
    text = text.strip()
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n... ({len(text) - limit} more characters)"


def _kind(cl: Any, device_type: int) -> str:
    types = cl.device_type
    if device_type & types.GPU:
        return "gpu"
    if device_type & (types.ACCELERATOR | getattr(types, "CUSTOM", 0)):
        return "fpga"
    return "cpu"


def _text(value: Any) -> str:
    return str(value).strip()


class OpenclCard:
    """One OpenCL device as the sessions of this process share it."""

    def __init__(self, cl: Any, index: int, device: Any, memory_cap: int | None, *,
                 binaries: str | None = None) -> None:
        self.cl, self.index, self.device = cl, index, device
        platform = device.platform
        self.total = int(device.global_mem_size)
        self.capacity = self.total if memory_cap is None else min(memory_cap, self.total)
        self.max_alloc = int(device.max_mem_alloc_size)
        self.max_group = int(device.max_work_group_size)
        self.max_items = tuple(int(v) for v in device.max_work_item_sizes)
        self.align = max(1, int(device.mem_base_addr_align) // 8)     # bits -> bytes
        self.fp64 = "cl_khr_fp64" in _text(device.extensions).split()
        self.kind = _kind(cl, int(device.type))
        self.name = _text(device.name) or f"OpenCL device {index}"
        rounded = getattr(cl.device_fp_config, "CORRECTLY_ROUNDED_DIVIDE_SQRT", 0)
        self._catalog_options = b"-cl-fp32-correctly-rounded-divide-sqrt" \
            if rounded and int(device.single_fp_config) & rounded else b""
        self.facts: dict[str, Any] = {
            "platform": _text(platform.name), "platform_version": _text(platform.version),
            "device_version": _text(device.version),
            "driver_version": _text(device.driver_version),
            "opencl_c_version": _text(getattr(device, "opencl_c_version", "")),
            "global_mem_size": self.total, "max_mem_alloc_size": self.max_alloc,
            "max_work_group_size": self.max_group,
            "compute_units": int(device.max_compute_units),
            "mem_base_addr_align": self.align, "fp64": self.fp64,
        }
        self._lock = threading.Lock()
        self._context: Any = None
        self._service: Any = None
        self._catalog: Any = None
        self._catalog_error: str | None = None
        self._groups: dict[str, int] = {}
        #: kernel name -> built program, of the operator's installed binaries
        self.installed: dict[str, Any] = {}
        if binaries:
            self._install(binaries)

    # -- context and queues ----------------------------------------------------------
    @property
    def context(self) -> Any:
        """The device's context in this process (created on first use)."""
        with self._lock:
            if self._context is None:
                self._context = self.cl.Context([self.device])
            return self._context

    def queue(self) -> Any:
        """A new in-order command queue with profiling on."""
        props = self.cl.command_queue_properties.PROFILING_ENABLE
        return self.cl.CommandQueue(self.context, self.device, properties=props)

    def _service_queue(self) -> Any:
        if self._service is None:
            queue = self.queue()
            with self._lock:
                if self._service is None:
                    self._service = queue
        return self._service

    # -- memory ----------------------------------------------------------------------
    def allocate(self, nbytes: int) -> "ClMemory":
        """A zeroed buffer of `nbytes` (its zeroing may still be running: `ClMemory.ready`)."""
        if nbytes > self.max_alloc:
            raise OutOfMemoryError(f"{nbytes} bytes is more than this OpenCL device allocates "
                                   f"at once (max_mem_alloc_size {self.max_alloc})")
        cl = self.cl
        buf = cl.Buffer(self.context, cl.mem_flags.READ_WRITE, max(nbytes, 1))
        queue = self._service_queue()
        ready = fill(cl, queue, buf, 0, 0, max(nbytes, 1), None)
        queue.flush()         # a command of another queue may wait for it
        return ClMemory(buf, nbytes, ready)

    def cancel_flag(self) -> Any:
        """A session's cancel flag: a zeroed 4-byte buffer every catalog kernel reads first."""
        cl = self.cl
        return cl.Buffer(self.context, cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR,
                         hostbuf=np.zeros(1, np.int32))

    def raise_flag(self, flag: Any) -> None:
        """Set a cancel flag, without waiting: the catalog kernels that start once it has
        landed return at once. (A fill, not a write: its pattern is copied when it is
        queued, so no host memory has to outlive the call; not waited for, since a device
        busy with the session's kernels may take a while to get to it.)"""
        queue = self._service_queue()
        self.cl.enqueue_fill_buffer(queue, flag, np.ones(1, np.int32), 0, 4)
        queue.flush()

    # -- code ------------------------------------------------------------------------
    def build(self, source: str, options: bytes = b"") -> Any:
        """OpenCL C built for this device (a `HarpError` with the build log if it fails)."""
        try:
            program = self.cl._Program(self.context, source)
            program.build(options, [self.device])
            return program
        except self.cl.Error as exc:
            raise ArgumentError(f"the OpenCL C did not build on {self.name}: "
                                f"{_cut(str(exc))}") from None

    def load_binary(self, binary: bytes) -> Any:
        """A program binary (clGetProgramInfo BINARIES for this device), built."""
        try:
            program = self.cl._Program(self.context, [self.device], [binary])
            program.build(b"", [self.device])
            return program
        except self.cl.Error as exc:
            raise ArgumentError(f"{self.name} refused the opencl-binary image: "
                                f"{_cut(str(exc))}") from None

    def _install(self, directory: str) -> None:
        """Build every `*.bin` in `directory` for this device; what this device refuses is
        listed in the facts, with the reason, and left out."""
        import pathlib
        refused: dict[str, str] = {}
        for path in sorted(pathlib.Path(directory).glob("*.bin")):
            try:
                program = self.load_binary(path.read_bytes())
                names = str(program.get_info(self.cl.program_info.KERNEL_NAMES))
            except (OSError, HarpError) as exc:
                refused[path.name] = _cut(str(exc), 300)
                continue
            for name in (n for n in names.split(";") if n):
                if name not in catalog.KERNELS:
                    self.installed.setdefault(name, program)
        self.facts["installed_kernels"] = sorted(self.installed)
        if refused:
            self.facts["installed_refused"] = refused

    def catalog_program(self) -> Any:
        """The catalog built for this device, once per process."""
        with self._lock:
            if self._catalog is not None:
                return self._catalog
            if self._catalog_error is not None:
                raise DeviceError(self._catalog_error)
        try:
            program = self.build(programs.catalog_source(self.fp64), self._catalog_options)
        except ArgumentError as exc:
            with self._lock:
                self._catalog_error = f"the HARP catalog does not build on this device: " \
                                      f"{exc.message}"
            raise DeviceError(self._catalog_error) from None
        with self._lock:
            if self._catalog is None:
                self._catalog = program
            return self._catalog

    def group_size(self, kernel: catalog.Kernel, cl_kernel: Any) -> int:
        """The work-group size of a catalog kernel on this device (worked out once)."""
        with self._lock:
            size = self._groups.get(kernel.name)
        if size is None:
            allowed = min(self.kernel_group_limit(cl_kernel), self.max_items[0])
            size = programs.group_size(kernel, allowed)
            with self._lock:
                self._groups[kernel.name] = size
        return size

    def kernel_group_limit(self, cl_kernel: Any) -> int:
        """The most work-items per group this device runs `cl_kernel` with."""
        info = self.cl.kernel_work_group_info.WORK_GROUP_SIZE
        return int(cl_kernel.get_work_group_info(info, self.device))


class ClMemory:
    """One allocation: its buffer, its requested size, and the event of its zeroing
    until that is known to be done."""

    __slots__ = ("buf", "size", "ready")

    def __init__(self, buf: Any, size: int, ready: Any) -> None:
        self.buf, self.size, self.ready = buf, size, ready


class ClStream:
    """A stream: its queue, its kernels and other commands not yet seen done
    ((seq, call, event), oldest first), and the event of the last command queued (None
    once the queue is known idle)."""

    __slots__ = ("queue", "launches", "transfers", "last")

    def __init__(self, queue: Any) -> None:
        self.queue = queue
        self.launches: deque = deque()
        self.transfers: deque = deque()
        self.last: Any = None


class ClEvent:
    """An event: the marker of its latest recording, or None while never recorded."""

    __slots__ = ("marker",)

    def __init__(self) -> None:
        self.marker: Any = None


class ClKernel:
    """A function handle's target: the session's `cl.Kernel`, the catalog kernel (or None),
    its work-group size (catalog) or limit (client kernels), and its argument count."""

    __slots__ = ("name", "kernel", "catalog", "group", "num_args", "types")

    def __init__(self, name: str, kernel: Any, catalog_kernel: catalog.Kernel | None,
                 group: int, num_args: int) -> None:
        self.name, self.kernel, self.catalog = name, kernel, catalog_kernel
        self.group, self.num_args = group, num_args
        #: The scalar dtypes (None: a buffer) the kernel's arguments are set as, for a
        #: client kernel: set again when a launch's differ.
        self.types: tuple | None = None


class ClProgram:
    """A loaded client module: the program and the names of its kernels."""

    __slots__ = ("program", "names")

    def __init__(self, program: Any, names: list[str]) -> None:
        self.program, self.names = program, names


def fill(cl: Any, queue: Any, buf: Any, value: int, offset: int, nbytes: int,
         wait_for: list | None) -> Any:
    """Queue setting `nbytes` of `buf` at `offset` to the byte `value`; the last event.

    A long fill's aligned middle uses a 16-byte pattern (OpenCL wants a fill's offset
    and size to be multiples of its pattern's), its ends one byte at a time."""
    byte = np.full(1, value, np.uint8)
    if nbytes < WIDE_FILL:
        return cl.enqueue_fill_buffer(queue, buf, byte, offset, nbytes, wait_for=wait_for)
    start = -(-offset // _PATTERN) * _PATTERN
    end = (offset + nbytes) // _PATTERN * _PATTERN
    event = cl.enqueue_fill_buffer(queue, buf, np.full(_PATTERN, value, np.uint8), start,
                                   end - start, wait_for=wait_for)
    for lo, hi in ((offset, start), (end, offset + nbytes)):
        if hi > lo:
            event = cl.enqueue_fill_buffer(queue, buf, byte, lo, hi - lo, wait_for=wait_for)
    return event


class OpenclDevice(BackendDevice):
    """A session on an `OpenclCard`: the hooks of `BackendDevice` on PyOpenCL."""

    CLIENT_CODE = {"opencl-source": (
        "this OpenCL device does not compile OpenCL C sent to it (the pool server runs "
        "without --trust-client-code): build the program for the device on the client "
        "(pyopencl: cl.Program(ctx, source).build().binaries[0]) and load that as an "
        "opencl-binary, or run the server with --trust-client-code")}
    ALIGNED_CATALOG = True

    _card: OpenclCard

    def _open(self) -> None:
        card = self._card
        self._cl = card.cl
        self._complete = card.cl.command_execution_status.COMPLETE
        self._kernels: dict[str, Any] = {}       # catalog kernels of this session, by name
        self._timed: deque = deque()             # launches under the compute gate, uncharged
        self._staged: deque = deque()            # (event, bytes) of staged writes
        self._staged_bytes = 0
        try:
            self._cancel = card.cancel_flag()
            self._streams[0] = self._new_stream()
        except Exception as exc:
            raise DeviceError(f"cannot open a session on {card.name}: "
                              f"{type(exc).__name__}: {exc}") from exc

    # -- failures and bookkeeping --------------------------------------------------------
    def _failure(self, exc: BaseException, call: str, seq: int) -> HarpError:
        if isinstance(exc, HarpError):
            err = exc
        elif isinstance(exc, MemoryError):
            err = OutOfMemoryError(f"out of host memory: {exc}")
        elif isinstance(exc, self._cl.Error) and getattr(exc, "code", None) in OUT_OF_MEMORY_CODES:
            err = OutOfMemoryError(f"the OpenCL device is out of memory or resources: {exc}")
        else:
            err = DeviceError(f"OpenCL: {type(exc).__name__}: {exc}")
        if err.call is None:
            err.call, err.seq = call, seq
        return err

    def _deps(self, *mems: ClMemory) -> list | None:
        """The zeroing events a command on these buffers must wait for (None: none)."""
        out = None
        for mem in mems:
            ev = mem.ready
            if ev is None:
                continue
            if ev.command_execution_status == self._complete:
                mem.ready = None
            elif out is None:
                out = [ev]
            elif ev not in out:
                out.append(ev)
        return out

    def _idle(self, stream: ClStream) -> bool:
        last = stream.last
        if last is not None and last.command_execution_status == self._complete:
            stream.last = last = None
        return last is None

    def _check_event(self, seq: int, call: str, ev: Any) -> None:
        """Keep the failure of a command seen failed for the next sync call, naming it."""
        status = ev.command_execution_status
        if status < 0:
            err = DeviceError(f"it failed on the device (OpenCL status {status})",
                              call=call, seq=seq)
            self._errors.add(err, call, seq)

    def _prune(self, pending: deque) -> None:
        """Forget the commands at the head of `pending` that are done (reporting failures)."""
        while pending:
            seq, call, ev = pending[0]
            if ev.command_execution_status > 0:      # queued, submitted or running
                return
            pending.popleft()
            self._check_event(seq, call, ev)

    def _issued(self, stream: ClStream, pending: deque, call: str, seq: int, ev: Any) -> None:
        self._prune(pending)
        stream.last = ev
        pending.append((seq, call, ev))

    def _settle(self, stream: ClStream) -> None:
        """After the queue finished: report what failed on it, and forget what ran."""
        for pending in (stream.launches, stream.transfers):
            while pending:
                self._check_event(*pending.popleft())
        stream.last = None

    def _stage(self, nbytes: int) -> None:
        """Make room for `nbytes` of a staged write: wait for the oldest staged writes while
        the session has more than `MAX_STAGED_BYTES` outstanding."""
        staged = self._staged
        while staged:
            ev, n = staged[0]
            if ev.command_execution_status > 0:          # still outstanding
                if self._staged_bytes + nbytes <= MAX_STAGED_BYTES:
                    return
                try:
                    ev.wait()
                except Exception:  # its failure is reported by its stream
                    pass
            staged.popleft()
            self._staged_bytes -= n

    # -- memory --------------------------------------------------------------------------
    def _allocate(self, nbytes: int) -> ClMemory:
        return self._card.allocate(nbytes)

    def _release(self, mem: ClMemory, seq: int) -> None:
        mem.buf.release()       # OpenCL keeps it until the commands queued on it are done

    def _store(self, stream: ClStream, mem: ClMemory, offset: int, view: memoryview,
               seq: int) -> None:
        cl = self._cl
        deps = self._deps(mem)
        if self._idle(stream):
            # Nothing ahead of it on the queue: write now (one copy, nothing kept).
            cl.enqueue_copy(stream.queue, mem.buf, view, dst_offset=offset, is_blocking=True,
                            wait_for=deps)
            return
        self._stage(view.nbytes)
        staging = cl.Buffer(self._card.context, cl.mem_flags.READ_ONLY |
                            cl.mem_flags.COPY_HOST_PTR, hostbuf=view)
        ev = cl.enqueue_copy(stream.queue, mem.buf, staging, byte_count=view.nbytes,
                             dst_offset=offset, wait_for=deps)
        staging.release()       # kept by OpenCL until the copy is done
        self._staged.append((ev, view.nbytes))
        self._staged_bytes += view.nbytes
        self._issued(stream, stream.transfers, "write", seq, ev)

    def _fetch(self, stream: ClStream, mem: ClMemory, offset: int, nbytes: int,
               dst: np.ndarray | None) -> bytes | None:
        cl = self._cl
        deps = self._deps(mem)
        if nbytes == 0:
            if deps:
                cl.wait_for_events(deps)
            self._sync_stream(stream)
            return None if dst is not None else b""
        if dst is not None:
            cl.enqueue_copy(stream.queue, dst, mem.buf, src_offset=offset, is_blocking=True,
                            wait_for=deps)
            got = None
        else:
            # Mapped and copied out once (on a CPU device the map is the buffer itself).
            view, _ = cl.enqueue_map_buffer(stream.queue, mem.buf, cl.map_flags.READ, offset,
                                            (nbytes,), np.uint8, wait_for=deps,
                                            is_blocking=True)
            try:
                got = view.tobytes()
            finally:
                view.base.release(stream.queue)
                del view
        self._settle(stream)
        return got

    def _copy(self, stream: ClStream, dst: ClMemory, dst_offset: int, src: ClMemory,
              src_offset: int, nbytes: int, seq: int) -> None:
        cl = self._cl
        deps = self._deps(dst, src)
        if dst is src and abs(dst_offset - src_offset) < nbytes:
            # Overlapping ranges of one buffer: through a temporary buffer, like memmove.
            bounce = cl.Buffer(self._card.context, cl.mem_flags.READ_WRITE, nbytes)
            cl.enqueue_copy(stream.queue, bounce, src.buf, byte_count=nbytes,
                            src_offset=src_offset, wait_for=deps)
            ev = cl.enqueue_copy(stream.queue, dst.buf, bounce, byte_count=nbytes,
                                 dst_offset=dst_offset)
            bounce.release()
        else:
            ev = cl.enqueue_copy(stream.queue, dst.buf, src.buf, byte_count=nbytes,
                                 src_offset=src_offset, dst_offset=dst_offset, wait_for=deps)
        self._issued(stream, stream.transfers, "copy", seq, ev)

    def _fill(self, stream: ClStream, mem: ClMemory, offset: int, nbytes: int, value: int,
              seq: int) -> None:
        ev = fill(self._cl, stream.queue, mem.buf, value, offset, nbytes, self._deps(mem))
        self._issued(stream, stream.transfers, "fill", seq, ev)

    # -- code ----------------------------------------------------------------------------
    def _load_catalog(self) -> Any:
        return self._card.catalog_program()      # built once per device and process

    def _load(self, image: bytes | str, format: str) -> ClProgram:
        if format == "opencl-binary":
            if isinstance(image, str):
                raise ArgumentError("an opencl-binary image is bytes (clGetProgramInfo "
                                    "BINARIES), got str")
            program = self._card.load_binary(image)
        else:       # opencl-source, on a session that trusts client code (the base checked)
            source = image.decode("utf-8", "replace") if isinstance(image, bytes) else image
            program = self._card.build(source)
        names = str(program.get_info(self._cl.program_info.KERNEL_NAMES))
        return ClProgram(program, [n for n in names.split(";") if n])

    def _catalog_target(self, kernel: catalog.Kernel) -> ClKernel:
        if kernel.dtype == "float64" and not self._card.fp64:
            raise ArgumentError(f"{kernel.name}: this OpenCL device ({self._card.name}) has no "
                                "fp64 (cl_khr_fp64), so the catalog's f64 kernels are not "
                                "available on it")
        clk = self._kernels.get(kernel.name)
        if clk is None:
            clk = self._cl.Kernel(self._card.catalog_program(), kernel.name)
            clk.set_scalar_arg_dtypes(programs.arg_dtypes(kernel))   # fast argument setting
            self._kernels[kernel.name] = clk
        group = self._card.group_size(kernel, clk)
        return ClKernel(kernel.name, clk, kernel, group, int(clk.num_args))

    def _installed_target(self, name: str) -> ClKernel | None:
        program = self._card.installed.get(name)
        if program is None:
            return None
        clk = self._cl.Kernel(program, name)
        return ClKernel(name, clk, None, self._card.kernel_group_limit(clk), int(clk.num_args))

    def _lookup(self, loaded: Loaded, name: str) -> ClKernel:
        image: ClProgram = loaded.payload
        if name not in image.names:
            raise ArgumentError(f"module has no kernel {name!r}; it has "
                                f"{', '.join(sorted(image.names)) or 'none'}")
        clk = self._cl.Kernel(image.program, name)
        return ClKernel(name, clk, None, self._card.kernel_group_limit(clk), int(clk.num_args))

    def _prepare(self, target: ClKernel, grid: tuple[int, int, int],
                 block: tuple[int, int, int], args: list) -> tuple:
        if target.catalog is not None:
            kernel = target.catalog
            spans, values = self._catalog_spans(kernel, args)
            sizes = {k: int(values[k]) for k in ("n", "m", "k") if k in values}
            global_size, local_size = programs.ndrange(kernel, sizes, target.group)
            mems = [s.mem for s in spans if isinstance(s, CatalogSpan)]
            return (programs.launch_args(kernel, self._cancel, spans), mems, (global_size,),
                    (local_size,))
        if len(args) != target.num_args:
            raise ArgumentError(f"kernel {target.name} takes {target.num_args} arguments, "
                                f"got {len(args)}")
        dims = max([i + 1 for i in range(3) if grid[i] != 1 or block[i] != 1] or [1])
        threads = block[0] * block[1] * block[2]
        if threads > target.group:
            raise ArgumentError(f"cannot launch {target.name}: a block of {threads} work-items; "
                                f"this device runs it with at most {target.group}")
        for axis in range(dims):
            if block[axis] > self._card.max_items[axis]:
                raise ArgumentError(f"cannot launch {target.name}: block dimension "
                                    f"{'xyz'[axis]} is {block[axis]}; this device allows "
                                    f"{self._card.max_items[axis]}")
        cl_args, mems, types = [], [], []
        for arg in args:
            value, mem = self._client_arg(arg)
            cl_args.append(value)
            types.append(value.dtype if mem is None else None)
            if mem is not None:
                mems.append(mem)
        if tuple(types) != target.types:
            target.kernel.set_scalar_arg_dtypes(types)
            target.types = tuple(types)
        global_size = tuple(grid[i] * block[i] for i in range(dims))
        return cl_args, mems, global_size, tuple(block[:dims])

    def _client_arg(self, arg: Any) -> tuple[Any, ClMemory | None]:
        """A client kernel's argument as OpenCL takes it, and the buffer it is in."""
        if isinstance(arg, Scalar):
            return catalog.scalar_value(arg.value, arg.dtype), None
        if isinstance(arg, ArrayArg):
            mem = self._mem(arg.buffer)
            offset = check_count(arg.offset, "array offset")
            _check_extent(mem.size, offset, np.dtype(arg.dtype), arg.shape, arg.strides)
        elif isinstance(arg, BufferArg):
            mem, offset = self._arg_memory(arg)
        else:
            raise ArgumentError(f"unknown kernel argument {arg!r}")
        if offset == 0:
            return mem.buf, mem
        if offset % self._card.align:
            raise ArgumentError(f"a buffer argument at byte offset {offset}: this OpenCL device "
                                f"passes buffers from offsets that are multiples of "
                                f"{self._card.align} bytes only (mem_base_addr_align)")
        if offset >= mem.size:
            raise ArgumentError(f"a buffer argument at byte offset {offset} of a buffer of "
                                f"{mem.size} bytes has no bytes to pass")
        return mem.buf.get_sub_region(offset, mem.size - offset), mem

    def _launch(self, stream: ClStream, target: ClKernel, prepared: tuple,
                grid: tuple[int, int, int], block: tuple[int, int, int], shared_mem: int,
                seq: int) -> None:
        cl_args, mems, global_size, local_size = prepared
        if shared_mem and target.catalog is None:
            raise ArgumentError(f"cannot launch {target.name} with shared_mem={shared_mem}: "
                                "OpenCL kernels take local memory as __local parameters "
                                "(declare a __local array in the kernel instead)")
        try:
            target.kernel.set_args(*cl_args)
        except (self._cl.Error, TypeError, ValueError, OverflowError) as exc:
            raise ArgumentError(f"the arguments do not fit kernel {target.name}'s parameters: "
                                f"{exc}") from None
        deps = self._deps(*mems)
        gate = self._gate
        if gate is not None:
            gate.enter()
        try:
            ev = self._cl.enqueue_nd_range_kernel(stream.queue, target.kernel, global_size,
                                                  local_size, wait_for=deps)
        finally:
            if gate is not None:
                gate.exit(self._harvest())
                gate.idle()      # queued: nothing held on the host until the next launch
        self._issued(stream, stream.launches, "launch", seq, ev)
        if gate is not None:
            self._timed.append(ev)

    def _harvest(self) -> int:
        """Device time (ns) of the launches under the compute gate that have finished since
        the last harvest (from the oldest on, up to the first still running: later ones are
        charged later)."""
        total, timed = 0, self._timed
        while timed:
            ev = timed[0]
            try:
                status = ev.command_execution_status
                if status > 0:                 # not done yet
                    break
                if status == self._complete:
                    total += int(ev.profile.end - ev.profile.start)
            except Exception:                  # no profile for a failed command: no charge
                pass
            timed.popleft()
        return total

    # -- order ---------------------------------------------------------------------------
    def _new_stream(self) -> ClStream:
        return ClStream(self._card.queue())

    def _new_event(self) -> ClEvent:
        return ClEvent()

    def _record(self, event: ClEvent, stream: ClStream, seq: int) -> None:
        event.marker = self._cl.enqueue_marker(stream.queue)
        stream.queue.flush()         # another queue may wait for it
        stream.last = event.marker

    def _recorded(self, event: ClEvent) -> bool:
        return event.marker is not None

    def _wait_event(self, stream: ClStream, event: ClEvent, seq: int) -> None:
        stream.last = self._cl.enqueue_barrier(stream.queue, wait_for=[event.marker])

    def _sync_stream(self, stream: ClStream) -> None:
        stream.queue.finish()
        self._settle(stream)

    def _sync_all(self) -> None:
        super()._sync_all()
        if self._gate is not None:
            self._gate.idle()

    def _elapsed_ms(self, start: ClEvent, end: ClEvent) -> float:
        if start.marker is end.marker:
            return 0.0
        start.marker.wait()
        end.marker.wait()
        return (end.marker.profile.end - start.marker.profile.end) / 1e6

    # -- lifetime ------------------------------------------------------------------------
    def _shutdown(self) -> None:
        """Stop issuing, and release what this session holds without waiting for its queued
        work: its queued catalog kernels find the cancel flag set and return at once, and
        OpenCL keeps each released buffer until the commands that use it are done."""
        try:
            self._card.raise_flag(self._cancel)
        except Exception:           # a device that fails now runs nothing more anyway
            pass
        for stream in self._streams.values():
            try:
                stream.queue.flush()
            except Exception:
                pass
        for mem in self._buffers.values():
            try:
                mem.buf.release()
            except Exception:
                pass
        self._kernels.clear()
        self._timed.clear()
        self._staged.clear()


def _check_extent(size: int, offset: int, dtype: np.dtype, shape: tuple[int, ...],
                  strides: tuple[int, ...] | None) -> None:
    """Raise unless an array of `shape` and `strides` (bytes; C order when None) at byte
    `offset` lies inside a buffer of `size` bytes."""
    if strides is None:
        strides, step = [], dtype.itemsize
        for extent in reversed(shape):
            strides.insert(0, step)
            step *= max(extent, 1)
    if len(strides) != len(shape):
        raise ArgumentError(f"array argument: {len(shape)} dimensions but {len(strides)} strides")
    if any(extent < 0 for extent in shape):
        raise ArgumentError(f"array argument: negative extent in shape {list(shape)}")
    if 0 in shape:
        return
    lo = offset + sum((e - 1) * s for e, s in zip(shape, strides) if s < 0)
    hi = offset + sum((e - 1) * s for e, s in zip(shape, strides) if s > 0) + dtype.itemsize
    if lo < 0 or hi > size:
        raise ArgumentError(f"array argument {dtype.name}{list(shape)} at offset {offset} does "
                            f"not fit its buffer of {size} bytes")
