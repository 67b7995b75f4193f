"""Section "host": the host time of sn_ext's Triton backend per train step and per op, on each launch path, next to
plain `W * 1.0` forward + backward, measured on the CPU with the launches stubbed (sn_ext/triton/_dry_run.py: the
ops run up to Triton's launcher, nothing is compiled or launched), so it is measured on any machine, GPU or not.

On a GPU, eager Triton on a discriminator-sized layer is host-bound: the kernels take a few microseconds, the
Python around them (module, launch plans, allocations, launches, dispatch, autograd) tens. These rows follow that
host time; the goal: a module's train step at most 2x plain's.

Rows (`call`): "module train" (the goal: `module.weight` through sn_ext's parametrization, train mode, and its
backward by autograd.grad, as plain's: the eager path from the module to the launches); "ops train" (the forward op
recorded by autograd and its backward run by autograd.grad), "forward op", "backward op" (the ops alone, no
autograd). Path "one program" or "grid" (the weight is small either way: the grid path is forced by the launch-plan
knob, so both paths time the same weight and plain's compute is negligible). Every row is timed side by side with
plain, the two interleaved call by call over several blocks (benchmarks/timing.py); `plain_us` is plain's median in
the same run, `vs_plain` the ratio of the medians, `ratio_spread` how much the blocks' ratios differ (max / min - 1).
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

import sn_ext
from sn_ext import backends
from sn_ext.triton._dry_run import dry_run, why_not

from .layer import WeightHolder
from .records import log, rounded, timing_columns
from .timing import Step, sample_side_by_side, summarize

SHAPE = (64, 3, 3, 3)  # the first conv of an SN-GAN discriminator: one-program sized
PATHS = {"one program": {}, "grid": {"FUSED_MAX_NUMEL": 0}}
CALLS = ["module train", "ops train", "forward op", "backward op"]
COLUMNS = timing_columns(["provider", "call", "path", "shape"], ["plain_us", "vs_plain", "ratio_spread"])
REPEATS = 7  # blocks per row: enough that a row's ratio moves by a few percent between runs on a busy 2-core VM


@contextlib.contextmanager
def _knobs(settings: dict) -> Iterator[None]:
    from sn_ext.triton import _host

    saved = {name: getattr(_host, name) for name in settings}
    for name, value in settings.items():
        setattr(_host, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(_host, name, value)


def _inputs(seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(SHAPE, generator=gen)
    u = F.normalize(torch.randn(SHAPE[0], generator=gen), dim=0)
    v = F.normalize(torch.randn(weight[0].numel(), generator=gen), dim=0)
    return weight, u, v, torch.randn(SHAPE, generator=gen)


def plain_step(seed: int = 0) -> Callable[[], object]:
    """`W * 1.0` forward and backward: the floor of any autograd op on the weight."""
    weight, _, _, grad = _inputs(seed)
    weight.requires_grad_()
    return lambda: torch.autograd.grad(weight * 1.0, weight, grad)


def triton_module(weight: torch.Tensor) -> torch.nn.Module:
    """A layer holding `weight` with sn_ext's spectral norm on the Triton backend, on the CPU: built with the
    reference backend (the Triton one needs a GPU to be chosen), then given the Triton kernels, which the dry run
    lets run on CPU tensors."""
    module = sn_ext.spectral_norm(WeightHolder(weight), backend="reference")
    norm = module.parametrizations.weight[0]
    norm._kernels = backends.Kernels("triton", backends.get("triton"), weight.device, weight.dtype)
    return module


def triton_step(call: str, seed: int = 0) -> Callable[[], object]:
    """One `call` (see the module docstring) on the Triton backend, launches stubbed by the caller."""
    forward = backends.get("triton").forward  # the op through torch.ops, as modules call it
    backward = torch.ops.sn_ext.triton_spectral_normalize_backward.default
    weight, u, v, grad = _inputs(seed)
    if call == "module train":
        module = triton_module(weight.clone())
        original = module.parametrizations.weight.original
        return lambda: torch.autograd.grad(module.weight, original, grad)
    weight_sn, sigma, u_new, v_new = forward(weight, u, v, 0, 1, 1e-12, False)
    if call == "forward op":
        return lambda: forward(weight, u, v, 0, 1, 1e-12, False)
    if call == "backward op":
        return lambda: backward(grad, weight_sn, u_new, v_new, sigma, 0)
    weight.requires_grad_()
    return lambda: torch.autograd.grad(forward(weight, u, v, 0, 1, 1e-12, False)[0], weight, grad)


def measure_row(call: str, budget_s: float, repeats: int = REPEATS) -> dict:
    """One row: `call` and plain, interleaved; sn_ext's summary with plain's median, the ratio and its spread."""
    sampled = sample_side_by_side(
        {"plain": [Step(plain_step())], "sn_ext": [Step(triton_step(call))]},
        torch.device("cpu"),
        budget_s=budget_s,
        repeats=repeats,
        warmup=50,
    )
    ours, plain = summarize(sampled["sn_ext"], rotation=1), summarize(sampled["plain"], rotation=1)
    ratios = [
        statistics.median(a) / statistics.median(b) for a, b in zip(sampled["sn_ext"].blocks, sampled["plain"].blocks)
    ]
    return {
        **ours,
        "plain_us": plain["median_us"],
        "vs_plain": f"{ours['median_us'] / plain['median_us']:.2f}",
        "ratio_spread": f"{max(ratios) / min(ratios) - 1:.2f}",
    }


def run(*, quick: bool, write: Callable[[dict], None]) -> None:
    budget = 0.05 if quick else 0.4
    shape = "x".join(map(str, SHAPE))
    reason = why_not()
    for path, knobs in PATHS.items():
        for call in CALLS:
            row = {"provider": "sn_ext triton", "call": call, "path": path, "shape": shape}
            if reason:
                write({**row, "status": "skipped", "note": reason})
                continue
            with _knobs(knobs), dry_run():
                measured = measure_row(call, budget, repeats=3 if quick else REPEATS)
            write({**row, **rounded(measured), "status": "ok"})
            log(
                f"  host triton {path:11} {call:12} {measured['median_us']:7.1f} us, plain {measured['plain_us']:6.1f}"
                f" ({measured['vs_plain']}x, ratio spread {measured['ratio_spread']})"
            )


def main() -> None:
    """python -m benchmarks.host_overhead: prints the rows (1 CPU thread)."""
    torch.set_num_threads(1)
    run(quick=False, write=lambda row: None)


if __name__ == "__main__":
    main()
