"""Process-wide memory settings for sampling large models on the CPU.

glibc's ``malloc`` serves every allocation above 32 MiB (and, after it trims its heap, many smaller ones) with a
fresh ``mmap`` and returns it to the kernel on ``free``. A sampler allocates such buffers for every block of every
scale (the d16 FFN hidden of a 256-token scale at batch 8 is 64 MiB), so the kernel zero-fills and maps the same
pages again and again: on this project's 2-core machine the float32 VAR-d16 sampler at batch 8 took about a million
page faults and 4-9 s of system time per call, a sixth of its run time, with identical arithmetic.
:func:`keep_freed_memory` makes glibc serve large blocks from its heap and keep freed memory for reuse, which is
what the ``jemalloc``/``tcmalloc`` preloading that CPU inference guides recommend achieves without a preload.

The setting is process-wide and cannot be undone exactly (glibc stops adapting its thresholds once they are set),
and the heap keeps what it grew to (its top is trimmed only past 2 GiB of free space): a hole left by a freed
block is reused only by blocks that fit in it. That suits a
steady loop of same-sized calls (the batch-8 d16 sampler: no growth after the first call), but a workload whose
buffers keep growing can fragment the heap without bound: ``benchmarks/bench_sampler.py`` with it reached 24 GB and
was killed by the kernel's OOM killer during its batch-32 runs (the drop-in's ``torch.cat`` KV caches grow at every
scale), where glibc's defaults peak at 6.6 GB. So it is strictly opt-in (``VARCORE_BENCH_KEEP_FREED_MEMORY=1``
for the benchmarks); use it for repeated calls of one size, such as the fast samplers' static-cache loops.
"""
import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # mallopt parameters from glibc's malloc.h
_M_MMAP_MAX = -4
_TRIM_ABOVE = 2**31 - 1  # mallopt takes an int: trim only when over 2 GiB of free heap sits at the top

_applied = False


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse: no ``mmap`` for large blocks and no trimming of the heap top below
    2 GiB (``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD, 2**31 - 1)``). Returns True when the settings
    are in effect (also on later calls), False where they do not apply (not Linux with glibc)."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success
    _applied = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_ABOVE) == 1
    return _applied
