"""A program whose work happens in a child Python process (`python -c ...`) that imports
numba.cuda itself and launches a kernel defined in a file (saxpy.py, beside this one)."""
import os
import subprocess
import sys

CHILD = r'''
import sys
import numpy as np
from numba import cuda
sys.path.insert(0, sys.argv[1])
from saxpy import saxpy
x = np.arange(100, dtype=np.float32)
d = cuda.device_array_like(x)
saxpy[2, 64](d, np.float32(3.0), cuda.to_device(x), cuda.to_device(np.ones_like(x)))
out = d.copy_to_host()
print("child numba.cuda:", type(sys.modules["numba.cuda"]).__name__)
print("child sum", float(out.sum()), "last", float(out[-1]))
'''


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run([sys.executable, "-c", CHILD, here], capture_output=True, text=True,
                            check=True)
    sys.stdout.write(result.stdout)
    print("parent done")


if __name__ == "__main__":
    main()
