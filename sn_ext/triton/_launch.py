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


def _hooks_check():
    """A function telling whether a launch hook is set (a profiler's: Triton's launches then compute its metadata,
    so these go through JITFunction.run), or None where the direct path must not run (an older Triton without
    `triton.knobs`)."""
    try:
        from triton import knobs
    except ImportError:  # pragma: no cover - triton < 3.4
        return None
    runtime = knobs.runtime

    def hooked() -> bool:  # triton 3.6 and 3.8: HookChains, empty unless hooks were added
        enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
        return bool(
            enter is not None and getattr(enter, "calls", True) or leave is not None and getattr(leave, "calls", True)
        )

    return hooked


def current_stream(index: int) -> int:
    """The raw current CUDA stream of device `index` (what Triton's launches use; not asked for CPU tensors)."""
    return torch._C._cuda_getCurrentRawStream(index)


class Launch:
    """One launch of a plan: the kernel, its grid, and its constexprs and options (`meta`)."""

    __slots__ = ("kernel", "grid", "meta", "constexprs", "compiled")

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
        self.compiled: dict = {}  # call_key() -> the compiled kernel

    def __repr__(self) -> str:
        return f"Launch({getattr(self.kernel, '__name__', self.kernel)}, grid={self.grid})"


def call_key(device: int | None, *inputs: torch.Tensor) -> tuple:
    """What, besides its plan, selects the compiled variant of every launch of an op's call: the device (its index;
    None for CPU tensors, the interpreter and the dry run) and whether each of the caller's tensors is 16-byte
    aligned (Triton specializes pointers on it, for vector loads). The op's own new tensors are always aligned."""
    return (device, *[t.data_ptr() % 16 == 0 for t in inputs])


_hooked = _hooks_check()


def eager_launch(launch: Launch, key: tuple, *args) -> None:
    """Launches `launch` on real tensors, `key` its op call's call_key(): Triton's launcher directly where it can (see
    the module docstring), else JITFunction.run."""
    compiled = launch.compiled.get(key)
    if compiled is None or _hooked is None or _hooked():
        result = launch.kernel[launch.grid](*args, **launch.meta)
        if compiled is None and _hooked is not None and hasattr(result, "packed_metadata"):
            launch.compiled[key] = result
        return
    grid = launch.grid
    device = key[0]
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


def traced_launch(launch: Launch, key: tuple, *args) -> None:
    """What torch.compile traces: the launch through torch.library.wrap_triton."""
    torch.library.wrap_triton(launch.kernel)[launch.grid](*args, **launch.meta)


def device_guard(device: torch.device):
    """A context that makes `device` the current CUDA device when it is not (a weight on cuda:1 while cuda:0 is
    current), else None: the caller then launches without one (~0.3 us of host time saved on every call)."""
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return None
    return torch.cuda.device(device)
