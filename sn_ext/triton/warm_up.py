"""Compiles the Triton kernel variants a model's spectral norms use, ahead of a run, in parallel processes, into
Triton's cache (a cold compile is 0.3-0.5 s per variant, one at a time in the process that first launches it).

    python -m sn_ext.triton.warm_up --shape 64x3x3x3 --shape 512x512x3x3 --dtype float32 --dtype bfloat16 --processes 16
    python -m sn_ext.triton.warm_up --calls path/to/file.py:function --processes 16

    sn_ext.triton.warm_up.warm_up(model, dtypes=(torch.bfloat16,), processes=8)

A layer's variants are those of its whole run: the warm-up at creation (15 power iterations), the training forward
(n_power_iterations) and backward, and the forward in eval mode (no power iteration). They are found without a GPU:
the layer's launches are bound as for the target GPU but not run (sn_ext/triton/_dry_run.py), then compiled with
triton.compile, which needs no GPU either (Triton bundles ptxas); the next launch of a variant, in any process on
this machine with the same Triton cache, loads it from the cache instead of compiling. The target is the current
CUDA device's architecture, or `--arch` (default sm_90) where there is no GPU. `--calls FILE:FUNCTION` warms up
whatever launches FUNCTION() makes (on CPU tensors), e.g. a test grid's.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable

import torch

CREATION_ROUNDS = 15  # sn_ext.spectral_norm's warm-up at creation, as torch's
_TYPES_DIM_1 = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
_TYPES_DIM_0 = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding)

Layer = tuple[tuple[int, ...], int, bool]  # weight shape, dim, v_first


def layers_of(shapes_or_model) -> list[Layer]:
    """The (shape, dim, v_first) of every spectral norm of a model (sn_ext's parametrizations and legacy hooks; a
    model without any: every Linear, Conv, ConvTranspose and Embedding weight, with torch's default dim), or of
    shapes given as tuples or "64x3x3x3" strings ("...:1" for dim 1)."""
    if isinstance(shapes_or_model, torch.nn.Module):
        return _model_layers(shapes_or_model)
    layers = []
    for shape in shapes_or_model:
        dim = 0
        if isinstance(shape, str):
            text, _, dim_text = shape.partition(":")
            shape, dim = tuple(int(s) for s in text.lower().split("x")), int(dim_text or 0)
        layers.append((tuple(shape), dim, False))
    return layers


def _model_layers(model: torch.nn.Module) -> list[Layer]:
    from ..nn.legacy_hook import SpectralNorm as LegacyHook
    from ..nn.spectral_norm import SpectralNorm

    layers = []
    for module in model.modules():
        for norms in getattr(module, "parametrizations", {}).values():
            for norm in norms:
                if isinstance(norm, SpectralNorm) and hasattr(norm, "_u"):
                    layers.append((tuple(norms.original.shape), norm.dim, False))
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, LegacyHook):
                layers.append((tuple(getattr(module, hook.name + "_orig").shape), hook.dim, True))
    if layers:
        return layers
    for module in model.modules():
        if isinstance(module, _TYPES_DIM_0 + _TYPES_DIM_1) and module.weight.dim() > 1:
            layers.append((tuple(module.weight.shape), 1 if isinstance(module, _TYPES_DIM_1) else 0, False))
    return layers


def layer_launches(shape, dim: int, dtype: torch.dtype, n_power_iterations: int = 1, v_first: bool = False) -> None:
    """Makes the launches of a layer's run (see the module docstring) on CPU tensors: run it under a dry run."""
    import torch.nn.functional as F

    forward = torch.ops.sn_ext.triton_spectral_normalize_.default
    backward = torch.ops.sn_ext.triton_spectral_normalize_backward.default
    weight = torch.randn(shape).to(dtype)
    rows = weight.shape[dim]
    u = F.normalize(torch.randn(rows), dim=0).to(dtype)
    v = F.normalize(torch.randn(weight.numel() // rows), dim=0).to(dtype)
    forward(weight, u, v, dim, CREATION_ROUNDS, 1e-12, v_first)
    weight_sn, sigma, u_new, v_new = forward(weight, u, v, dim, n_power_iterations, 1e-12, v_first)
    backward(weight_sn, weight_sn, u_new, v_new, sigma, dim)
    forward(weight, u, v, dim, 0, 1e-12, v_first)


def variants(calls: Callable[[], None]) -> dict:
    """The kernel variants (sn_ext/triton/_dry_run.py's Variants, by key) of the launches calls() makes."""
    from . import _dry_run

    reason = _dry_run.why_not()
    if reason:
        raise RuntimeError(f"sn_ext.triton.warm_up: cannot bind the launches here: {reason}")
    with _dry_run.dry_run() as found:
        calls()
    return found


def layers_variants(layers: Iterable[Layer], dtypes: Iterable[torch.dtype], n_power_iterations: int = 1) -> dict:
    """The kernel variants of the runs of `layers` (layers_of()) in each of `dtypes`."""
    layers, dtypes = list(layers), list(dtypes)

    def calls() -> None:
        for dtype in dtypes:
            for shape, dim, v_first in layers:
                layer_launches(shape, dim, dtype, n_power_iterations, v_first)

    return variants(calls)


def target():
    """The GPU to compile for: the current CUDA device's, else sm_90 (the dry run's binding target)."""
    from triton.backends.compiler import GPUTarget

    from ._dry_run import TARGET

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return GPUTarget("cuda", major * 10 + minor, 32)
    return GPUTarget(*TARGET)


def compile_variant(variant, gpu_target=None):
    """triton.compile of one variant, as JITFunction.run compiles it (the same source, target and options: the same
    cache entry)."""
    import triton
    from triton.compiler import ASTSource

    source = ASTSource(
        fn=variant.kernel, signature=variant.signature, constexprs=variant.constexprs, attrs=variant.attrs
    )
    return triton.compile(source, target=gpu_target or target(), options=variant.options)


def _compile_in_worker(job) -> tuple[str, float, str]:
    """A worker's compile of one variant, named by (module, kernel name) and its parts (JITFunctions do not pickle)."""
    module, name, signature, constexprs, attrs, options, arch = job
    from triton.backends.compiler import GPUTarget

    from . import load
    from ._dry_run import Variant

    load()
    kernel = getattr(importlib.import_module(module), name)
    start = time.perf_counter()
    try:
        compile_variant(Variant(kernel, signature, constexprs, attrs, options), GPUTarget("cuda", arch, 32))
    except Exception as error:  # reported by the parent, with the variant
        return name, time.perf_counter() - start, f"{type(error).__name__}: {error}"
    return name, time.perf_counter() - start, ""


def compile_all(found: dict, processes: int | None = None) -> list[tuple[str, float, str]]:
    """Compiles every variant of `found` (variants()) in `processes` worker processes (default: one per CPU);
    returns (kernel name, seconds, error or "") per variant."""
    gpu_target = target()
    jobs = [
        (v.kernel.fn.__module__, v.kernel.fn.__name__, v.signature, v.constexprs, v.attrs, v.options, gpu_target.arch)
        for v in found.values()
    ]
    processes = max(1, min(processes or os.cpu_count() or 1, len(jobs) or 1))
    if processes == 1:
        return [_compile_in_worker(job) for job in jobs]
    # spawn: a forked child would inherit this process's CUDA and Triton state
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
        return list(pool.map(_compile_in_worker, jobs))


def warm_up(
    shapes_or_model,
    dtypes: Iterable[torch.dtype] = (torch.float32,),
    processes: int | None = None,
    n_power_iterations: int = 1,
) -> int:
    """Compiles the kernel variants of a model's spectral norms (or of weights of the given shapes: see
    layers_of()) in `dtypes` into Triton's cache, in `processes` processes (default: one per CPU); returns how many.
    Raises RuntimeError if one fails to compile."""
    found = layers_variants(layers_of(shapes_or_model), dtypes, n_power_iterations)
    _check(compile_all(found, processes))
    return len(found)


def _check(results: list[tuple[str, float, str]]) -> None:
    failed = [f"{name}: {error}" for name, _, error in results if error]
    if failed:
        raise RuntimeError("sn_ext.triton.warm_up: variants failed to compile:\n" + "\n".join(failed))


def _calls_from(spec: str) -> Callable[[], None]:
    """FILE:FUNCTION -> the function, from a Python file (its directory first on sys.path, for its own imports)."""
    path, _, name = spec.rpartition(":")
    if not path or not name:
        raise SystemExit(f"--calls takes FILE:FUNCTION, got {spec!r}")
    path = os.path.abspath(path)
    sys.path.insert(0, os.path.dirname(path))
    module_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return getattr(module, name)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m sn_ext.triton.warm_up", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", action="append", default=[], help="a weight shape, e.g. 512x512x3x3 (:1 for dim 1)")
    p.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--n-power-iterations", type=int, default=1)
    p.add_argument("--calls", action="append", default=[], help="FILE:FUNCTION whose launches to warm up")
    p.add_argument("--processes", type=int, default=None, help="compile processes (default: one per CPU)")
    args = p.parse_args(argv)
    if not args.shape and not args.calls:
        p.error("give at least one --shape or --calls")
    from . import load

    loaded, reason = load()
    if not loaded:
        raise SystemExit(f"sn_ext.triton.warm_up: {reason}")
    dtypes = [getattr(torch, name) for name in args.dtype or ["float32"]]
    start = time.perf_counter()
    found = layers_variants(layers_of(args.shape), dtypes, args.n_power_iterations) if args.shape else {}
    for spec in args.calls:
        found.update(variants(_calls_from(spec)))
    results = compile_all(found, args.processes)
    _check(results)
    busy = sum(seconds for _, seconds, _ in results)
    print(
        f"sn_ext.triton.warm_up: {len(results)} kernel variants compiled for sm_{target().arch} in "
        f"{time.perf_counter() - start:.1f} s ({busy:.1f} s of compiling, {args.processes or os.cpu_count()} processes)"
    )


if __name__ == "__main__":
    main()
