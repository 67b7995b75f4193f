"""Triton launches without a GPU, for tools: every launch of sn_ext's Triton kernels bound as for an sm_90 GPU, then
not run.

Inside `dry_run()` a launch does what it does on a GPU host up to the driver: the first launch of a variant goes
through JITFunction.run, whose binder (argument binding, specialization: equal to 1, divisible by 16) and
compiled-kernel cache key run for a CUDA target, and returns a stand-in for the compiled kernel instead of compiling;
later launches of that variant take the ops' direct path (sn_ext/triton/_launch.py) to the stand-in's launcher,
which does nothing. No compile, no driver, no device: the ops run on CPU tensors. So on any machine one can time the
host side of an op (launch plans, allocations, launches: benchmarks/host_overhead.py), count the kernel variants a
model compiles (benchmarks/triton_variants.py) and compile exactly those for sm_90 (tests/triton_compile_check.py).
Not counted: the current stream's lookup and Triton's C launcher (argument packing and cuLaunchKernelEx, a few us
per launch), and on a JITFunction.run launch its two driver calls (current device and stream, ~1 us each).

`dry_run(verify=True)` also binds every direct launch again and checks that it is the variant the stand-in stands
for: the direct path's key (device and tensor alignments; the plan fixes the rest) must select the same variant as
Triton's own key (tests/test_triton.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

TARGET = ("cuda", 90, 32)  # sm_90, warp size 32


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compiled kernel a GPU would make: what triton.compile takes (ASTSource's parts and the options)."""

    kernel: object  # the JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict


def why_not() -> str:
    """ "" when sn_ext's Triton kernels are loaded as JIT functions (not interpreted), else why a dry run cannot run."""
    from . import interpreted, load

    loaded, reason = load()
    if not loaded:
        return reason
    try:  # Triton internals: the binder and cache key as JITFunction.run builds them (older triton lacks them)
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import make_backend  # noqa: F401
        from triton.runtime.jit import compute_cache_key, create_function_from_signature  # noqa: F401
    except ImportError as error:
        import triton

        return f"triton {triton.__version__} lacks the launch internals a dry run uses ({error})"
    if interpreted():
        return "the kernels were loaded for Triton's interpreter (TRITON_INTERPRET=1): nothing to bind"
    return ""


def launched_kernels() -> list:
    """The JIT functions the ops launch (made by _helpers.kernel), in the kernel modules."""
    from triton.runtime.jit import JITFunction

    from . import _gram, _grid, _one_program, spectral_normalize_backward

    modules = (_one_program, _grid, _gram, spectral_normalize_backward)
    return [
        value
        for module in modules
        for value in vars(module).values()
        if isinstance(value, JITFunction) and value.fn.__module__ == module.__name__ and value.do_not_specialize
    ]


def _knob(group: str, name: str, default):
    """triton.knobs.<group>.<name> where this triton has it, else `default`."""
    try:
        from triton import knobs
    except ImportError:  # pragma: no cover - triton < 3.4
        return default
    return getattr(getattr(knobs, group, None), name, default)


class _StandIn:
    """What JITFunction.run returns in a dry run in place of a compiled kernel: the ops' direct launches call its
    `run` as they would Triton's launcher (see _launch.eager_launch)."""

    packed_metadata = None
    function = None

    def __init__(self, key, bind, arguments: int, kwargs: dict, verify: bool):
        self.key = key
        self._bind = bind
        self._arguments = arguments  # how many of the launcher's arguments are not constexprs
        self._kwargs = kwargs
        self._verify = verify

    def run(self, grid_0, grid_1, grid_2, stream, function, metadata, launch_metadata, enter, exit, *args) -> None:
        if self._verify:
            key = self._bind(*args[: self._arguments], **self._kwargs)
            if key != self.key:
                raise AssertionError(f"{self.key[0]}: a direct launch of one variant binds as another ({key})")


@contextlib.contextmanager
def dry_run(verify: bool = False) -> Iterator[dict]:
    """Replaces every launch by Triton's binder and cache key (see the module docstring); yields a dict that fills
    with {(kernel name, cache key): Variant}, one entry per kernel variant a GPU would compile."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import compute_cache_key, create_function_from_signature

    backend = make_backend(GPUTarget(*TARGET))
    variants: dict = {}
    kernels = launched_kernels()

    def bind_only(kernel):
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        key_cache: dict = {}
        arguments = sum(1 for p in kernel.params if not p.is_constexpr)

        def bind(*args, **kwargs):
            bound, specialization, options = binder(*args, **kwargs)
            return (kernel.fn.__name__, compute_cache_key(key_cache, specialization, options))

        def run(*args, grid, warmup, **kwargs):
            # The options JITFunction.run adds (triton 3.6, 3.8): the same options, the same variant and cache key.
            kwargs["debug"] = kwargs.get("debug", kernel.debug) or _knob("runtime", "debug", False)
            mode = _knob("compilation", "instrumentation_mode", None)
            if mode is not None:
                kwargs["instrumentation_mode"] = mode
            key = bind(*args, **kwargs)
            if key not in variants:  # as a compile: once per variant
                bound, specialization, options = binder(*args, **kwargs)
                options, signature, constexprs, attrs = kernel._pack_args(
                    backend, kwargs, bound, specialization, options
                )
                variants[key] = Variant(kernel, signature, constexprs, attrs, options.__dict__)
            return _StandIn(key, bind, arguments, kwargs, verify)

        return run

    _forget_direct_launches()
    for kernel in kernels:
        kernel.run = bind_only(kernel)  # an instance attribute: shadows JITFunction.run until deleted
    try:
        yield variants
    finally:
        for kernel in kernels:
            del kernel.run
        _forget_direct_launches()  # no launch after the dry run may reach a stand-in


def _forget_direct_launches() -> None:
    """Clears the ops' launch plans, and with them the compiled kernels (or stand-ins) their launches hold."""
    from . import spectral_normalize, spectral_normalize_backward

    spectral_normalize.forget_plans()
    spectral_normalize_backward.forget_plans()
