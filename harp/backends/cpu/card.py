"""The cpu backend's physical device: a capacity of host memory shared by sessions."""
from __future__ import annotations

import threading

import numpy as np

from ...errors import OutOfMemoryError


class CpuCard:
    """Host memory that plays a device's memory: allocation against a fixed capacity.

    Buffers come from `numpy.zeros`, i.e. fresh zeroed pages, so no tenant ever
    sees another tenant's bytes (the scrub the design asks of every device).
    """

    def __init__(self, index: int, capacity: int) -> None:
        self.index = index
        self.capacity = capacity
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return self._used

    def allocate(self, nbytes: int) -> np.ndarray:
        """Reserve and return `nbytes` of zeroed memory, or raise `OutOfMemoryError`."""
        with self._lock:
            if self._used + nbytes > self.capacity:
                raise OutOfMemoryError(
                    f"cannot allocate {nbytes} bytes: {self.capacity - self._used} of "
                    f"{self.capacity} bytes free on cpu device {self.index}")
            self._used += nbytes
        try:
            return np.zeros(nbytes, dtype=np.uint8)
        except MemoryError:
            self.release(nbytes)
            raise OutOfMemoryError(f"host could not provide {nbytes} bytes") from None

    def release(self, nbytes: int) -> None:
        with self._lock:
            self._used -= nbytes
