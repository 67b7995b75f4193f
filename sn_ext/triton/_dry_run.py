"""Triton launches without a GPU, for tools: every launch of sn_ext's Triton kernels bound as for an sm_90 GPU, then
not run.

Inside `dry_run()` a launch does what Triton's JITFunction.run does on the host before the driver call: its binder
(argument binding, specialization: equal to 1, divisible by 16) and the compiled-kernel cache key, for a CUDA
target. No compile, no driver, no device: the ops run on CPU tensors. So on any machine one can time the host side
of an op (launch plans, allocations, binder: benchmarks/host_overhead.py), count the kernel variants a model
compiles (benchmarks/triton_variants.py) and compile exactly those for sm_90 (tests/triton_compile_check.py). Not
counted: Triton's two driver calls per launch (current device and stream, ~1 us each) and the launch itself.
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
    """The JIT functions the ops launch (made by _helpers.kernel), in both op modules."""
    from triton.runtime.jit import JITFunction

    from . import spectral_normalize, spectral_normalize_backward

    modules = (spectral_normalize, spectral_normalize_backward)
    return [
        value
        for module in modules
        for value in vars(module).values()
        if isinstance(value, JITFunction) and value.fn.__module__ == module.__name__ and value.do_not_specialize
    ]


@contextlib.contextmanager
def dry_run() -> Iterator[dict]:
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

        def run(*args, grid, warmup, **kwargs):
            kwargs["debug"] = kernel.debug
            bound, specialization, options = binder(*args, **kwargs)
            key = (kernel.fn.__name__, compute_cache_key(key_cache, specialization, options))
            if key not in variants:  # as a compile: once per variant
                options, signature, constexprs, attrs = kernel._pack_args(
                    backend, kwargs, bound, specialization, options
                )
                variants[key] = Variant(kernel, signature, constexprs, attrs, options.__dict__)

        return run

    for kernel in kernels:
        kernel.run = bind_only(kernel)  # an instance attribute: shadows JITFunction.run until deleted
    try:
        yield variants
    finally:
        for kernel in kernels:
            del kernel.run
