"""Device facts from NVML (`nvidia-ml-py`, imported as `pynvml`), when it is there.

Every function here returns what it could find and never raises: a machine without
NVML, or a GPU that NVML cannot see (a container, MIG), only means fewer facts.
GPUs are matched by PCI bus id, because NVML numbers devices in PCI order while
CUDA, by default, numbers them fastest first (and honours CUDA_VISIBLE_DEVICES).
"""
from __future__ import annotations

import threading
from typing import Any

_lock = threading.Lock()
_state: dict[str, Any] = {}


def _nvml() -> Any | None:
    """The initialised pynvml module, or None (remembered, with the reason)."""
    with _lock:
        if "module" in _state:
            return _state["module"]
        try:
            import pynvml
            pynvml.nvmlInit()
            _state["module"] = pynvml
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, driver not loaded
            _state["module"] = None
            _state["error"] = f"{type(exc).__name__}: {exc}"
        return _state["module"]


def unavailable_reason() -> str | None:
    """Why NVML facts are missing, or None when NVML works."""
    return None if _nvml() is not None else _state.get("error", "NVML not initialised")


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _handle(nvml: Any, index: int, pci_bus_id: str | None) -> Any:
    if pci_bus_id:
        try:
            return nvml.nvmlDeviceGetHandleByPciBusId(pci_bus_id.encode())
        except Exception:
            pass
    return nvml.nvmlDeviceGetHandleByIndex(index)


def facts(index: int, pci_bus_id: str | None = None) -> dict[str, Any]:
    """Name, driver, temperature (°C), utilization (%), memory (bytes) and power (W) of a GPU,
    as plain JSON values under `nvml_*` keys; `{}` without NVML."""
    nvml = _nvml()
    if nvml is None:
        return {}
    out: dict[str, Any] = {}
    try:
        h = _handle(nvml, index, pci_bus_id)
    except Exception as exc:
        return {"nvml_error": f"{type(exc).__name__}: {exc}"}
    probes = {
        "nvml_name": lambda: _text(nvml.nvmlDeviceGetName(h)),
        "nvml_uuid": lambda: _text(nvml.nvmlDeviceGetUUID(h)),
        "driver_version": lambda: _text(nvml.nvmlSystemGetDriverVersion()),
        "temperature_c": lambda: int(nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)),
        "utilization_gpu_percent": lambda: int(nvml.nvmlDeviceGetUtilizationRates(h).gpu),
        "utilization_memory_percent": lambda: int(nvml.nvmlDeviceGetUtilizationRates(h).memory),
        "nvml_memory_total": lambda: int(nvml.nvmlDeviceGetMemoryInfo(h).total),
        "nvml_memory_used": lambda: int(nvml.nvmlDeviceGetMemoryInfo(h).used),
        "power_w": lambda: round(nvml.nvmlDeviceGetPowerUsage(h) / 1000.0, 1),
    }
    for key, probe in probes.items():
        try:
            out[key] = probe()
        except Exception:   # a fact this GPU or driver does not report
            pass
    return out


def readings(index: int, pci_bus_id: str | None = None, module: Any = None) -> dict[str, float]:
    """A GPU's live readings for a pool server's metrics, in base units: `utilization`
    (0 to 1, NVML's percentage of the last sample period a kernel ran),
    `temperature_celsius` and `power_watts`; those NVML cannot give are left out.
    `module` stands in for pynvml (tests); by default the initialised pynvml, or `{}`."""
    nvml = module if module is not None else _nvml()
    if nvml is None:
        return {}
    try:
        h = _handle(nvml, index, pci_bus_id)
    except Exception:
        return {}
    probes = {
        "utilization": lambda: nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100.0,
        "temperature_celsius": lambda: float(nvml.nvmlDeviceGetTemperature(
            h, nvml.NVML_TEMPERATURE_GPU)),
        "power_watts": lambda: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
    }
    out: dict[str, float] = {}
    for key, probe in probes.items():
        try:
            out[key] = float(probe())
        except Exception:   # a reading this GPU or driver does not give
            pass
    return out
