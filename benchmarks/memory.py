"""Peak memory of one call: torch.cuda.max_memory_allocated on a GPU; on the CPU, which has no allocator
statistics, the peak of the tensors torch.profiler's memory timeline sees (profile_memory; a private API, so "n/a"
where it fails)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .timing import synchronize

KIND = {
    "cuda": "torch.cuda.max_memory_allocated during one call",
    "cpu": "peak of live tensors during one call (torch.profiler memory timeline)",
}


def peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak MiB allocated by torch while `fn` runs (tensors that exist before it included), or None."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import MemoryProfileTimeline

        with profile(
            activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
        ) as prof:
            fn()
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(str(device))
        return max(sum(s) for s in sizes) / 2**20 if sizes else None
    except Exception:  # the private API moved: no number rather than a wrong one
        return None
