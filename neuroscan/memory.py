"""Memory figures every process of a scan reports for the manifest.

``peak_rss_mb`` is the kernel's peak resident set, which also counts pages of Ray's shared
object store that the process touched. ``anon_mb`` is the process's own (anonymous) memory
now; processes sample it once per micro-batch, so a growing private footprint shows up in
``peak_anon_mb`` without the object store's noise.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys

_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None


def peak_rss_mb() -> float:
    """Peak resident set size in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def anon_mb() -> float:
    """Current anonymous resident memory in MiB (Linux; 0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def release_free_heap() -> None:
    """Give glibc's free heap pages back to the OS.

    A CPU stage allocates and frees activation-sized blocks of a different size for every
    micro-batch shape; glibc keeps them on its heap and the footprint creeps up with each new
    shape. Trimming once per micro-batch keeps it flat for the cost of re-faulting the pages.
    """
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


class MemoryWatch:
    """Keeps the peak of `anon_mb` over the samples a process takes."""

    def __init__(self):
        self.peak_anon = anon_mb()

    def sample(self) -> None:
        self.peak_anon = max(self.peak_anon, anon_mb())

    def report(self) -> dict[str, float]:
        self.sample()
        return {"peak_rss_mb": peak_rss_mb(), "peak_anon_mb": self.peak_anon}
