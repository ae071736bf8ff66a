"""An atomic histogram: a grid-stride loop counts into a per-block shared histogram with
shared-memory atomics, then each block adds its counts to the global one atomically."""
import numpy as np
from numba import cuda, int32

NBINS = 16
N = 1000


@cuda.jit
def histogram(data, bins):
    local_bins = cuda.shared.array(NBINS, dtype=int32)
    tid = cuda.threadIdx.x
    if tid < NBINS:
        local_bins[tid] = 0
    cuda.syncthreads()
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(start, data.size, stride):
        cuda.atomic.add(local_bins, data[i] % NBINS, 1)
    cuda.syncthreads()
    if tid < NBINS:
        cuda.atomic.add(bins, tid, local_bins[tid])


@cuda.jit
def max_value(data, out):
    i = cuda.grid(1)
    if i < data.size:
        cuda.atomic.max(out, 0, data[i])


def main():
    rng = np.random.default_rng(11)
    data = rng.integers(0, 1 << 20, N).astype(np.int32)
    d_data = cuda.to_device(data)
    d_bins = cuda.to_device(np.zeros(NBINS, dtype=np.int32))
    histogram[3, 32](d_data, d_bins)
    bins = d_bins.copy_to_host()
    top = np.zeros(1, dtype=np.int32)
    max_value[(N + 63) // 64, 64](d_data, top)     # a host array: copied in and back
    print("bins", " ".join(str(v) for v in bins))
    print("total", int(bins.sum()), "max", int(top[0]))
    assert np.array_equal(bins, np.bincount(data % NBINS, minlength=NBINS))
    assert top[0] == data.max()


if __name__ == "__main__":
    main()
