"""How the Triton ops launch their kernels: a `Launch` is one launch of a plan (a kernel, its grid, its constexprs and
options, all fixed by the plan), called with the kernel's other arguments in order.

Eager calls (`eager_launch`) skip most of Triton's per-launch host work. `kernel[grid](...)` (JITFunction.run) binds
every argument and computes the variant's cache key on each launch (~5 us on this project's CPU, about a third of a
one-program forward's host time), although a plan fixes everything that key depends on except the 16-byte alignment
of the tensors and the device. So a Launch keeps the compiled kernel Triton returned for each (device, alignments)
and launches it directly, as CompiledKernel's own `kernel[grid](*args)` does: Triton's launcher with the current
stream of the device. The first launch of each goes through JITFunction.run (which compiles or loads the variant),
and so does every launch while a launch hook is set (a profiler's) or where Triton lacks this interface.
`torch.compile` traces `traced_launch` instead (torch.library.wrap_triton).

`device_guard` makes the weight's device current for the launches, as the C++ ops' CUDA guard: Triton launches on
the current device, whatever device the tensors are on.
"""

from __future__ import annotations

import torch


def _launch_hooks_getter():
    """A function returning Triton's launch-enter hook (set by profilers), or None where the fast path must not run
    (an older Triton without `triton.knobs`)."""
    try:
        from triton import knobs
    except ImportError:  # pragma: no cover - triton < 3.4
        return None
    runtime = knobs.runtime
    return lambda: runtime.launch_enter_hook


def current_stream(index: int) -> int:
    """The raw current CUDA stream of device `index` (what Triton's launches use). The dry run replaces it."""
    return torch._C._cuda_getCurrentRawStream(index)


class Launch:
    """One launch of a plan: the kernel, its grid, and its constexprs and options (`meta`)."""

    __slots__ = ("kernel", "grid", "meta", "constexprs", "tensors", "compiled")

    def __init__(self, kernel, grid: tuple[int, ...], **meta):
        self.kernel = kernel
        self.grid = (*grid, 1, 1)[:3]
        self.meta = meta
        params = getattr(kernel, "params", None)  # None: an interpreted kernel, always launched through Triton
        if params is not None:
            constexprs = [p.is_constexpr for p in params]
            assert constexprs == sorted(constexprs), f"{kernel}: the launcher takes the constexprs last"
        # The constexprs' values, after the other arguments (Triton's launcher takes them all and skips these).
        self.constexprs = tuple(meta[p.name] for p in params or () if p.is_constexpr)
        self.tensors: tuple[int, ...] | None = None  # positions of the tensor arguments, from the first call
        self.compiled: dict = {}  # (device index, each tensor 16-byte aligned) -> the compiled kernel

    def __repr__(self) -> str:
        return f"Launch({getattr(self.kernel, '__name__', self.kernel)}, grid={self.grid})"


_hook = _launch_hooks_getter()


def eager_launch(launch: Launch, device: int | None, *args) -> None:
    """Launches `launch` on real tensors on device `device` (its index; None for CPU tensors: the interpreter and
    the dry run): Triton's launcher directly where it can (see the module docstring), else JITFunction.run."""
    # Triton specializes a variant on each tensor's 16-byte alignment (for vector loads), the rest of the key is the
    # plan's.
    tensors = launch.tensors
    if tensors is None:
        tensors = launch.tensors = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
    key = (device, *[args[i].data_ptr() % 16 == 0 for i in tensors])
    compiled = launch.compiled.get(key)
    if compiled is None or _hook is None or _hook() is not None:
        result = launch.kernel[launch.grid](*args, **launch.meta)
        if compiled is None and _hook is not None and hasattr(result, "packed_metadata"):
            launch.compiled[key] = result
        return
    grid = launch.grid
    compiled.run(
        grid[0],
        grid[1],
        grid[2],
        current_stream(device) if device is not None else 0,
        compiled.function,
        compiled.packed_metadata,
        None,
        None,
        None,
        *args,
        *launch.constexprs,
    )


def traced_launch(launch: Launch, device: int | None, *args) -> None:
    """What torch.compile traces: the launch through torch.library.wrap_triton."""
    torch.library.wrap_triton(launch.kernel)[launch.grid](*args, **launch.meta)


def device_guard(device: torch.device):
    """A context that makes `device` the current CUDA device when it is not (a weight on cuda:1 while cuda:0 is
    current), else None: the caller then launches without one (~0.3 us of host time saved on every call)."""
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return None
    return torch.cuda.device(device)
