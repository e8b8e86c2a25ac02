"""Peak resident memory of this process, as the operating system sees it (Linux).

PyTorch keeps no allocator statistics for CPU tensors and tracemalloc does not see them, so the
benchmarks measure the resident set instead: :func:`reset_peak_memory` starts a
measurement, :func:`peak_memory` reads the highest resident size since then (``VmHWM``).

Freed memory that glibc keeps for reuse stays resident and would hide the next workload's
allocations from the peak, so a reset first returns it to the OS (``malloc_trim``). Elsewhere than
Linux the reset is a no-op and the peak falls back to the lifetime maximum of ``getrusage``.
"""

from __future__ import annotations

import ctypes
import resource
from pathlib import Path

_STATUS = Path("/proc/self/status")


def _status_bytes(field: str) -> int | None:
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def reset_peak_memory() -> int:
    """Start a new peak measurement; return the resident bytes now (0 where unknown)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_bytes("VmRSS") or 0


def peak_memory() -> int:
    """Peak resident bytes since the last :func:`reset_peak_memory`."""
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
