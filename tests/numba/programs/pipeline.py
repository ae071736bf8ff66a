"""A multi-stream pipeline: chunks go up, through two kernels and back down on their own
streams; an event orders a second stream after the first, and one stage uses dynamic
shared memory (kernel[grid, block, stream, shared_bytes])."""
import math

import numpy as np
from numba import cuda, float32

CHUNK = 128
CHUNKS = 3
THREADS = 64


@cuda.jit
def poly(x):
    i = cuda.grid(1)
    coeff = cuda.local.array(3, dtype=float32)
    coeff[0] = 1.0
    coeff[1] = -0.5
    coeff[2] = 0.25
    if i < x.size:
        v = x[i]
        x[i] = coeff[0] + coeff[1] * v + coeff[2] * v * v + math.sqrt(abs(v))


@cuda.jit
def reverse_blocks(src, dst):
    tile = cuda.shared.array(0, dtype=float32)      # sized by the launch
    tid = cuda.threadIdx.x
    i = cuda.grid(1)
    if i < src.size:
        tile[tid] = src[i]
    cuda.syncthreads()
    j = cuda.blockIdx.x * cuda.blockDim.x + (cuda.blockDim.x - 1 - tid)
    if i < dst.size and j < src.size:
        dst[i] = tile[cuda.blockDim.x - 1 - tid]


def main():
    host = np.arange(CHUNK * CHUNKS, dtype=np.float32) / 16.0
    streams = [cuda.stream() for _ in range(CHUNKS)]
    outs = []
    for k, s in enumerate(streams):
        chunk = host[k * CHUNK:(k + 1) * CHUNK]
        d_in = cuda.to_device(chunk, stream=s)
        d_out = cuda.device_array_like(chunk, stream=s)
        poly[CHUNK // THREADS, THREADS, s](d_in)
        reverse_blocks[CHUNK // THREADS, THREADS, s, THREADS * 4](d_in, d_out)
        outs.append((d_out, s))
    # stream 0's result feeds a kernel on stream 1, ordered by an event
    done0 = cuda.event()
    done0.record(streams[0])
    done0.wait(streams[1])
    both = cuda.device_array(CHUNK, dtype=np.float32, stream=streams[1])
    both.copy_to_device(outs[0][0], stream=streams[1])
    poly[CHUNK // THREADS, THREADS, streams[1]](both)
    start, end = cuda.event(), cuda.event()
    start.record(streams[2])
    end.record(streams[2])
    results = [d.copy_to_host(stream=s) for d, s in outs]
    with streams[1].auto_synchronize():
        twice = both.copy_to_host(stream=streams[1])
    end.synchronize()
    start.elapsed_time(end)      # a time (meaningless in the simulator): not printed
    cuda.synchronize()
    for k, r in enumerate(results):
        print("chunk", k, "first", " ".join(f"{v:.4f}" for v in r[:3]),
              "sum", f"{float(r.astype(np.float64).sum()):.3f}")
    print("twice", " ".join(f"{v:.4f}" for v in twice[:4]))
    expect = np.concatenate([(1 - 0.5 * host + 0.25 * host * host + np.sqrt(np.abs(host)))
                             [k * CHUNK:(k + 1) * CHUNK].reshape(-1, THREADS)[:, ::-1].ravel()
                             for k in range(CHUNKS)])
    assert np.allclose(np.concatenate(results), expect, rtol=1e-5)


if __name__ == "__main__":
    main()
