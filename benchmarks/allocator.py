"""The host allocator's state, held the same for every provider: freed memory stays in the process's heap.

Why: torch's CPU allocator is glibc's malloc, which serves a request above its mmap threshold (128 KiB, raised up to
32 MiB as such blocks are freed) with fresh pages from mmap when no free chunk of the heap fits, and every first
touch of such a page is a page fault (~1.2 µs per 4 KiB page here, where a float32 4096x4096 `W * 1.0` forward and
backward took 48 ms with its 32770 faults and 10 ms without). Whether a large step output gets fresh pages or a free
chunk of the heap depends on what the process freed before: measured on the 2-core AMD EPYC, a bfloat16 4096x4096
`W * 1.0` took 11-18 ms with 8193 faults in a fresh process and 2.5 ms with none after 40 MiB of small tensors had been
freed. The same provider's time then depends on which providers ran before it, and the largest weights' ratios
measure the heap's history, not the kernels. With mmap off and the heap never trimmed below 1 GiB of free top, every
step after the warm-up reuses the chunks the previous step freed, for every provider alike: the steady state of a
training loop under any caching allocator (jemalloc, tcmalloc, the CUDA caching allocator on the GPU's side).
`python -m benchmarks --system-malloc` keeps glibc's defaults instead; the CSVs' faults_per_call column shows the
page faults each call made in either case.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource

# mallopt(3) parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_FREE_TOP_BYTES = 1 << 30

SYSTEM = "system default"


def keep_freed_memory() -> str:
    """Sets glibc's malloc to serve every request from the heap and keep what is freed (see the module's doc);
    returns what the allocator now does, in words, for the report (SYSTEM when this is not glibc)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None or not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, _KEEP_FREE_TOP_BYTES)):
        return SYSTEM
    return "glibc malloc, freed memory kept in the heap (mmap off; benchmarks/allocator.py)"


def page_faults() -> int:
    """Page faults this process has taken so far (minor and major)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt + usage.ru_majflt
