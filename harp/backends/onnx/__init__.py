"""The `onnx` backend: ONNX Runtime as an NPU-class device (`pip install 'harp[onnx]'`).

A device that runs ONNX models and the kernel catalog (as small ONNX graphs,
`graphs`) through ONNX Runtime's execution providers: CUDA, TensorRT,
OpenVINO, QNN, CANN, DirectML, CoreML and the others where the installed
onnxruntime build has them, always with the CPU provider last for what they do
not take. Device memory is host memory (`HostDevice`); with a provider other
than the CPU's, ONNX Runtime copies each run's inputs to the accelerator and its
outputs back (there are no device-resident buffers yet).

Options: `providers` (a list, or a comma-separated string; or `HARP_ONNX_PROVIDERS`)
names the execution providers in preference order (CPUExecutionProvider is added
last if missing); by default every provider the build reports that initialises
here, accelerators first. A requested provider that is not there makes the
backend unavailable, with the reason. `memory` (or `HARP_ONNX_MEMORY`) is each
device's capacity (default 4 GiB, like the cpu backend's); `devices` how many
such devices to offer (default 1); `ort` the onnxruntime module itself, or the
name to import it by (default `onnxruntime`, imported on first use), so a test
can stand in for it.

Without onnxruntime, or without the providers asked for, the backend is listed
and reports itself unavailable with the reason (`available` never raises);
`open` and `describe` then raise `BackendError`. The AzureExecutionProvider is
never used: it calls a remote endpoint and is not a device.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Sequence

from ..driver import DriverBackend
from ...device import Device
from ...tenancy import Tenancy
from ...types import DeviceInfo
from ...units import parse_size

__all__ = ["OnnxBackend", "PREFERENCE", "CPU", "select_providers"]

DEFAULT_MEMORY = 4 << 30
CPU = "CPUExecutionProvider"
#: Execution providers in the order a default device prefers them (accelerators first;
#: providers not named here come after these, before the CPU's).
PREFERENCE = (
    "CUDAExecutionProvider", "TensorrtExecutionProvider", "MIGraphXExecutionProvider",
    "ROCMExecutionProvider", "OpenVINOExecutionProvider", "QNNExecutionProvider",
    "CANNExecutionProvider", "VitisAIExecutionProvider", "DmlExecutionProvider",
    "CoreMLExecutionProvider", "NnapiExecutionProvider", "RknpuExecutionProvider",
    "VSINPUExecutionProvider", "WebGpuExecutionProvider", "DnnlExecutionProvider",
    "ACLExecutionProvider", "ArmNNExecutionProvider", "XnnpackExecutionProvider",
)
#: Providers that are not devices: never chosen, and refused when asked for.
NOT_DEVICES = {"AzureExecutionProvider": "it sends inputs to a remote Azure endpoint"}

#: An ONNX model of one Identity node, float[1] input "x" to output "y" (opset 17), as
#: `onnx.helper` serializes it: the probe that a provider initialises (no onnx import).
PROBE_MODEL = (b"\x08\x08:;\n\x10\n\x01x\x12\x01y\"\x08Identity\x12\x05probe"
               b"Z\x0f\n\x01x\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01"
               b"b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\x11")


def select_providers(available: Sequence[str], requested: Sequence[str] | None
                     ) -> tuple[list[str], str]:
    """The providers a device uses, and "" or why that cannot be: the `requested` ones in
    their order (each must be `available`), else every available device provider in
    `PREFERENCE` order; CPUExecutionProvider always last."""
    available = list(available)
    if requested:
        for p in requested:
            if p in NOT_DEVICES:
                return [], f"{p} is not a device ({NOT_DEVICES[p]})"
            if p not in available:
                return [], (f"execution provider {p} is not in this onnxruntime build; it has "
                            f"{', '.join(available) or 'none'}")
        chosen = [p for p in dict.fromkeys(requested) if p != CPU]
    else:
        rank = {p: i for i, p in enumerate(PREFERENCE)}
        chosen = sorted((p for p in available if p != CPU and p not in NOT_DEVICES),
                        key=lambda p: (rank.get(p, len(rank)), p))
    return chosen + [CPU], ""


def _parse_providers(value: Any) -> list[str] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()] or None
    return [str(p) for p in value] or None


def _message(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + "..."


class OnnxBackend(DriverBackend):
    """Drives `devices` ONNX Runtime devices of `memory` bytes each (see the module
    docstring for the options)."""

    name = "onnx"
    #: Importing these creates no ONNX Runtime session or thread, so a fork server may.
    preload = ("harp.backends.onnx", "harp.backends.onnx.device", "onnxruntime", "onnx")

    def __init__(self, *, memory: int | str | None = None, ort: Any = None,
                 providers: Sequence[str] | str | None = None, devices: int = 1,
                 **options: Any) -> None:
        super().__init__(**options)
        self._driver = ort if ort is not None else "onnxruntime"
        memory = memory if memory is not None else os.environ.get("HARP_ONNX_MEMORY") or \
            DEFAULT_MEMORY
        self.memory = parse_size(memory)
        self.requested = _parse_providers(
            providers if providers is not None else os.environ.get("HARP_ONNX_PROVIDERS"))
        self.count = int(devices)
        self._runtime: Any = None

    # -- availability ------------------------------------------------------------------
    def _probe(self) -> tuple[bool, str]:
        ort = self._driver
        if isinstance(ort, str):
            try:
                ort = importlib.import_module(ort)
            except Exception as exc:     # ImportError, or a broken build
                return False, (f"onnxruntime is not installed or does not load "
                               f"(pip install 'harp[onnx]'): {_message(exc)}")
        try:
            listed = list(ort.get_available_providers())
        except Exception as exc:
            return False, f"onnxruntime does not list its execution providers: {_message(exc)}"
        chosen, why = select_providers(listed, self.requested)
        if why:
            return False, why
        usable, skipped = [], {}
        for p in chosen:
            ok, reason = self._initialises(ort, p)
            if ok:
                usable.append(p)
            elif self.requested and p in self.requested or p == CPU:
                return False, f"execution provider {p} does not initialise here: {reason}"
            else:
                skipped[p] = reason
        from .device import Runtime
        self._runtime = Runtime(ort, tuple(usable), skipped)
        return True, ""

    @staticmethod
    def _initialises(ort: Any, provider: str) -> tuple[bool, str]:
        """Whether a session on `provider` (then the CPU's) really uses it here: a build
        may list a provider whose libraries or device are missing."""
        try:
            so = ort.SessionOptions()
            so.log_severity_level = 4
            providers = [provider] if provider == CPU else [provider, CPU]
            sess = ort.InferenceSession(PROBE_MODEL, so, providers=providers)
            if provider not in sess.get_providers():
                return False, "onnxruntime fell back to other providers"
        except Exception as exc:
            return False, _message(exc)
        return True, ""

    def device_count(self) -> int:
        ok, _ = self.available()
        return self.count if ok else 0

    # -- devices -----------------------------------------------------------------------
    def _make_card(self, index: int) -> "OnnxCard":
        return OnnxCard(self._runtime, index, self.memory)

    def _info(self, card: "OnnxCard", memory: int, trusted: bool = False) -> DeviceInfo:
        runtime = card.runtime
        extra: dict[str, Any] = {"onnxruntime_version": runtime.version,
                                 "providers": list(runtime.providers),
                                 "opsets": dict(runtime.opsets),
                                 "host_cores": os.cpu_count()}
        if runtime.skipped:
            extra["skipped_providers"] = dict(runtime.skipped)
        return DeviceInfo(kind="npu", name=f"ONNX Runtime {runtime.version} "
                                           f"({runtime.providers[0]})",
                          backend="onnx", index=card.index, memory=memory,
                          formats=("catalog", "onnx"), extra=extra)

    def _session(self, card: "OnnxCard", info: DeviceInfo, tenancy: Tenancy,
                 trust_client_code: bool) -> Device:
        from .device import OnnxDevice
        return OnnxDevice(card.runtime, card.index, info, tenancy.memory,
                          compute=tenancy.compute, trust_client_code=trust_client_code)


class OnnxCard:
    """One onnx device: the runtime (its providers) and the device's capacity."""

    __slots__ = ("runtime", "index", "capacity")

    def __init__(self, runtime: Any, index: int, capacity: int) -> None:
        self.runtime, self.index, self.capacity = runtime, index, capacity
