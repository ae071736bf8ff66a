"""A tiled matrix product: each block computes one TILE x TILE tile of C, staging tiles of A
and B through shared memory."""
import numpy as np
from numba import cuda, float32

TILE = 8
M, K, N = 24, 16, 16


@cuda.jit
def matmul(a, b, c):
    sa = cuda.shared.array(shape=(TILE, TILE), dtype=float32)
    sb = cuda.shared.array(shape=(TILE, TILE), dtype=float32)
    row, col = cuda.grid(2)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    acc = float32(0.0)
    for t in range((a.shape[1] + TILE - 1) // TILE):
        sa[tx, ty] = 0
        sb[tx, ty] = 0
        if row < a.shape[0] and t * TILE + ty < a.shape[1]:
            sa[tx, ty] = a[row, t * TILE + ty]
        if col < b.shape[1] and t * TILE + tx < b.shape[0]:
            sb[tx, ty] = b[t * TILE + tx, col]
        cuda.syncthreads()
        for k in range(TILE):
            acc += sa[tx, k] * sb[k, ty]
        cuda.syncthreads()
    if row < c.shape[0] and col < c.shape[1]:
        c[row, col] = acc


def main():
    rng = np.random.default_rng(7)
    a = rng.integers(-4, 5, (M, K)).astype(np.float32)
    b = rng.integers(-4, 5, (K, N)).astype(np.float32)
    d_a, d_b = cuda.to_device(a), cuda.to_device(b)
    d_c = cuda.device_array((M, N), dtype=np.float32)
    grid = ((M + TILE - 1) // TILE, (N + TILE - 1) // TILE)
    matmul[grid, (TILE, TILE)](d_a, d_b, d_c)
    c = d_c.copy_to_host()
    print("grid", grid, "block", (TILE, TILE))
    for r in (0, 5, M - 1):
        print("row", r, " ".join(str(int(v)) for v in c[r]))
    print("trace", int(np.trace(c[:N, :N])), "sum", int(c.sum()))
    # a column of C through a strided device view
    print("col3", " ".join(str(int(v)) for v in d_c[:, 3].copy_to_host()))
    assert np.array_equal(c, a @ b)


if __name__ == "__main__":
    main()
