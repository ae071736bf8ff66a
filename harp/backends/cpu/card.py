"""The cpu backend's physical device: host memory that plays a device's memory."""
from __future__ import annotations

import numpy as np

from ...errors import OutOfMemoryError


class CpuCard:
    """One cpu device: its index and capacity. Sessions reserve bytes of the capacity
    from their `MemoryBroker` (`harp.tenancy`) before they allocate here.

    Buffers come from `numpy.zeros`, i.e. fresh zeroed pages, so no tenant ever
    sees another tenant's bytes (the scrub the design asks of every device).
    """

    def __init__(self, index: int, capacity: int) -> None:
        self.index = index
        self.capacity = capacity

    def allocate(self, nbytes: int) -> np.ndarray:
        """`nbytes` of zeroed host memory, or `OutOfMemoryError` when the host has none."""
        try:
            return np.zeros(nbytes, dtype=np.uint8)
        except MemoryError:
            raise OutOfMemoryError(f"host could not provide {nbytes} bytes") from None
