"""saxpy: out = a * x + y, one thread per element, on a grid of several blocks."""
import numpy as np
from numba import cuda

N = 300
THREADS = 64


@cuda.jit
def saxpy(out, a, x, y):
    i = cuda.grid(1)
    if i < out.size:
        out[i] = a * x[i] + y[i]


def main():
    x = np.arange(N, dtype=np.float32) * np.float32(0.5)
    y = np.linspace(-1.0, 1.0, N).astype(np.float32)
    d_x, d_y = cuda.to_device(x), cuda.to_device(y)
    d_out = cuda.device_array_like(x)
    blocks = (N + THREADS - 1) // THREADS
    saxpy[blocks, THREADS](d_out, np.float32(2.0), d_x, d_y)
    out = d_out.copy_to_host()
    print("device:", "ok" if cuda.is_available() else "missing")
    print("n", N, "blocks", blocks)
    print("head", " ".join(f"{v:.4f}" for v in out[:6]))
    print("tail", " ".join(f"{v:.4f}" for v in out[-3:]))
    print("sum", f"{float(out.astype(np.float64).sum()):.3f}")
    # slicing a device array gives a view; an element index reads one value
    print("slice", " ".join(f"{v:.4f}" for v in d_out[10:14].copy_to_host()), f"{d_out[7]:.4f}")
    assert np.allclose(out, 2 * x + y)


if __name__ == "__main__":
    main()
