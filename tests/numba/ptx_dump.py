"""Run a numba program's main() (under `harp run`, so its kernels are HARP's), then write the
PTX of every kernel for every signature it was launched with: what a CUDA device would get.

    harp run --device local:cpu -- python ptx_dump.py PROGRAM.py OUT_DIR
"""
import contextlib
import importlib.util
import io
import json
import os
import sys

path, out = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location("program", path)
program = importlib.util.module_from_spec(spec)
spec.loader.exec_module(program)
with contextlib.redirect_stdout(io.StringIO()):
    program.main()

from harp.client.numba_shim import Dispatcher  # noqa: E402
from harp.client.numba_shim.ptx import entry_name  # noqa: E402

written = []
for name, kernel in vars(program).items():
    if isinstance(kernel, Dispatcher):
        for n, (key, ptx) in enumerate(kernel.inspect_asm(cc=(9, 0)).items()):
            file = os.path.join(out, f"{name}.{n}.ptx")
            with open(file, "w") as f:
                f.write(ptx)
            written.append({"kernel": name, "key": key, "file": file, "entry": entry_name(ptx)})
print(json.dumps(written))
