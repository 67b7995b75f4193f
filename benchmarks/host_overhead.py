"""Section "host": the host time of sn_ext's Triton ops per op, launch path and autograd, next to plain `W * 1.0`
forward + backward, measured on the CPU with the launches stubbed (sn_ext/triton/_dry_run.py: Triton's binder runs,
nothing is compiled or launched), so it is measured on any machine, GPU or not.

On a GPU, eager Triton on a discriminator-sized layer is host-bound: the kernels take a few microseconds, the
Python around them (launch plans, allocations, binder, dispatch, autograd) tens to hundreds. These rows follow that
host time; `vs plain` is the ratio to plain's train step (the goal: a train step at most 2x plain's).

Rows: op "forward" (one power iteration), "backward" (the backward op called directly) and "train" (both); path
"one program" or "grid" (the weight is small either way: the grid path is forced by the launch-plan knob, so both
paths time the same weight and plain's compute is negligible); autograd "no" (the ops called on tensors that do not
require grad) or "yes" (the forward recorded by autograd, and for "train" its backward through autograd).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from sn_ext import backends
from sn_ext.triton._dry_run import dry_run, why_not

from .records import log, rounded, timing_columns
from .timing import Step, measure

SHAPE = (64, 3, 3, 3)  # the first conv of an SN-GAN discriminator: one-program sized
PATHS = {"one program": {}, "grid": {"FUSED_MAX_NUMEL": 0}}
CASES = [("forward", "no"), ("forward", "yes"), ("backward", "no"), ("train", "no"), ("train", "yes")]
COLUMNS = timing_columns(["provider", "op", "path", "autograd", "shape"], ["vs_plain"])


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


def triton_step(op: str, autograd: str, seed: int = 0) -> Callable[[], object]:
    """One call of `op` (see the module docstring) on the Triton ops, launches stubbed by the caller."""
    # The forward as modules call it (sn_ext.backends.Backend.forward: the op, u and v updated in place by its kernels).
    forward = backends.get("triton").forward
    backward = torch.ops.sn_ext.triton_spectral_normalize_backward.default
    weight, u, v, grad = _inputs(seed)
    weight_sn, sigma, u_new, v_new = forward(weight, u, v, 0, 1, 1e-12, False)
    if autograd == "yes":
        weight.requires_grad_()
    if op == "forward":
        return lambda: forward(weight, u, v, 0, 1, 1e-12, False)
    if op == "backward":
        return lambda: backward(grad, weight_sn, u_new, v_new, sigma, 0)
    if autograd == "yes":
        return lambda: torch.autograd.grad(forward(weight, u, v, 0, 1, 1e-12, False)[0], weight, grad)

    def train() -> torch.Tensor:
        out, s, un, vn = forward(weight, u, v, 0, 1, 1e-12, False)
        return backward(grad, out, un, vn, s, 0)

    return train


def run(*, quick: bool, write: Callable[[dict], None]) -> None:
    budget = 0.05 if quick else 0.5
    shape = "x".join(map(str, SHAPE))
    plain = measure([Step(plain_step())], torch.device("cpu"), budget_s=budget)
    row = {"provider": "plain", "op": "train", "path": "-", "autograd": "yes", "shape": shape}
    write({**row, **rounded(plain), "vs_plain": "1.00", "status": "ok"})
    log(f"  host plain W * 1.0 train {plain['median_us']:8.1f} us")
    reason = why_not()
    for path, knobs in PATHS.items():
        for op, autograd in CASES:
            row = {"provider": "sn_ext triton", "op": op, "path": path, "autograd": autograd, "shape": shape}
            if reason:
                write({**row, "status": "skipped", "note": reason})
                continue
            with _knobs(knobs), dry_run():
                t = measure([Step(triton_step(op, autograd))], torch.device("cpu"), budget_s=budget)
            ratio = t["median_us"] / plain["median_us"]
            write({**row, **rounded(t), "vs_plain": f"{ratio:.2f}", "status": "ok"})
            log(f"  host triton {path:11} {op:8} autograd={autograd:3} {t['median_us']:8.1f} us ({ratio:.1f}x plain)")


def main() -> None:
    """python -m benchmarks.host_overhead: prints the rows (1 CPU thread)."""
    torch.set_num_threads(1)
    run(quick=False, write=lambda row: None)


if __name__ == "__main__":
    main()
