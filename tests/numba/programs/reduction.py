"""A block reduction: each block sums the squares of its slice in shared memory (a tree
reduction through a device function), and a second launch of the same kernel reduces the
per-block partials (to the sum of their squares)."""
import numpy as np
from numba import cuda, float64

BLOCK = 64
N = 250


@cuda.jit(device=True)
def square(v):
    return v * v


@cuda.jit
def block_sum_squares(x, partial):
    buf = cuda.shared.array(BLOCK, dtype=float64)
    tid = cuda.threadIdx.x
    i = cuda.grid(1)
    buf[tid] = square(x[i]) if i < x.size else 0.0
    cuda.syncthreads()
    step = BLOCK // 2
    while step > 0:
        if tid < step:
            buf[tid] += buf[tid + step]
        cuda.syncthreads()
        step //= 2
    if tid == 0:
        partial[cuda.blockIdx.x] = buf[0]


def main():
    x = (np.arange(N, dtype=np.float64) - 100.0) / 8.0
    blocks = (N + BLOCK - 1) // BLOCK
    d_x = cuda.to_device(x)
    d_partial = cuda.device_array(blocks, dtype=np.float64)
    d_total = cuda.device_array(1, dtype=np.float64)
    block_sum_squares[blocks, BLOCK](d_x, d_partial)
    block_sum_squares[1, BLOCK](d_partial, d_total)
    partial = d_partial.copy_to_host()
    print("blocks", blocks)
    print("partials", " ".join(f"{v:.6f}" for v in partial))
    print("sum of squares", f"{partial.sum():.6f}")
    print("sum of squared partials", f"{d_total.copy_to_host()[0]:.6f}")
    assert np.isclose(partial.sum(), (x * x).sum())
    assert np.isclose(d_total.copy_to_host()[0], (partial * partial).sum())


if __name__ == "__main__":
    main()
