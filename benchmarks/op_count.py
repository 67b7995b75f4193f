"""How many kernels (GPU) or dispatched ops (CPU) one call runs, from torch.profiler."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from .timing import synchronize

KIND = {
    "cuda": "CUDA kernels (kernels, memsets and copies on the GPU's timeline)",
    "cpu": "dispatched ops (aten:: and sn_ext:: ops called from Python or autograd, not counting the ops they "
    "call in turn; the CSV's ops_all counts those too)",
}
_OP_PREFIXES = ("aten::", "sn_ext::")


def count_ops(fn: Callable[[], object], device: torch.device) -> tuple[int, int]:
    """(count, all): on CUDA both are the kernels; on the CPU, the top-level aten::/sn_ext:: ops and all of them."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    events = prof.events()
    if device.type == "cuda":
        kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        return kernels, kernels
    ops = [e for e in events if e.name.startswith(_OP_PREFIXES)]
    return sum(1 for e in ops if not _inside_op(e)), len(ops)


def _inside_op(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(_OP_PREFIXES):
            return True
        parent = parent.cpu_parent
    return False
