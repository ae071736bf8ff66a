"""Byte sizes as people write them: "4GiB", "512MiB", "1e6", 4096."""
from __future__ import annotations

import math
import re

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "mib": 1 << 20,
          "gib": 1 << 30, "tib": 1 << 40, "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30,
          "ti": 1 << 40}


def parse_size(text: int | str) -> int:
    """Bytes from an int or a string with an optional unit (k/M/G decimal, Ki/Mi/Gi or
    KiB/MiB/GiB binary)."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"a size cannot be negative: {text}")
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 4096, 512MiB, 4GiB, 1.5GB, 1Mi)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not math.isfinite(value) or value >= 2**63:
        raise ValueError(f"a size too large: {text!r}")
    if 0 < value < 1:               # not rounded down to 0, which often means "no limit"
        raise ValueError(f"a size of less than one byte: {text!r}")
    return int(value)


def format_size(nbytes: int) -> str:
    """A short human form: 4.0 GiB, 512 MiB, 12 B."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            value = nbytes / size
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{nbytes} B"
