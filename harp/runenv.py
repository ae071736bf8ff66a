"""The environment `harp run` hands a program (the names its start-up hook reads too).

`harp/runhook.py` is copied into site-packages and runs before anything else
is importable, so it spells these names itself; a test keeps the two in step.
"""
from __future__ import annotations

#: The device `harp run` attaches: local:BACKEND[:INDEX], harp://..., lease:PATH, or "lease".
ENV_DEVICE = "HARP_RUN_DEVICE"
#: Trace file for the program's sessions (`harp run --trace`).
ENV_TRACE = "HARP_RUN_TRACE"
#: Client certificate directory for harp:// devices (`harp run --cert-dir`).
ENV_CERT_DIR = "HARP_RUN_CERT_DIR"
