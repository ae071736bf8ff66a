"""HARP's numba.cuda: see `harp.client.numba_shim.doc` (also this package's help())."""
from __future__ import annotations

from .api import Device, get_current_device
from .doc import TEXT as __doc__  # noqa: F401 - what help() shows
from .devicearray import DeviceNDArray
from .dispatcher import DeviceFunction, Dispatcher, jit
from .errors import Unsupported, UnsupportedAttributeError
from .module import SUPPORTED, UNSUPPORTED, ShimModule, module
from .session import Session, close_current, current, peek, use_device
from .streams import Event, Stream

__all__ = ["module", "ShimModule", "SUPPORTED", "UNSUPPORTED", "Session", "current", "peek",
           "use_device", "close_current", "DeviceNDArray", "Dispatcher", "DeviceFunction", "jit",
           "Stream", "Event", "Device", "get_current_device", "Unsupported",
           "UnsupportedAttributeError"]
