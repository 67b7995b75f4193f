"""Where the time of a small layer's spectral norm goes on the module path (`sn_ext.spectral_norm`), layer by layer:
the op alone (as the module calls it, and through torch.ops), under autograd, our parametrization's forward,
torch.nn.utils.parametrize's property, and the module, for one forward (train mode), a train step (forward +
backward, what benchmarks/layer.py's "train" mode times) and an eval forward (no_grad, no power iteration), next to
plain `W * 1.0` and torch's spectral norm.

`python -m benchmarks.module_overhead [--shape 64x3x3x3] [--dtype float32] [--backend cpu]` prints the table
(1 thread). Each row is the 10th percentile of its calls' times (benchmarks/timing.py), the lowest over a few
rounds of the whole table: the floor of a fixed cost, which is what this measures on a shared machine; "+" is the
row's cost over the row it builds on.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import nn

import sn_ext
from sn_ext import backends

from .layer import Plain, WeightHolder, parse_shape
from .timing import Step, low_percentile, sample

CPU = torch.device("cpu")


def floor_us(fn: Callable[[], object], budget_s: float = 0.6) -> float:
    """The 10th percentile of a call's time (µs) over about `budget_s` of calls, after 100 warm-up calls."""
    return low_percentile(sample([Step(fn)], CPU, budget_s=budget_s, warmup=100, max_reps=100_000).blocks)


def _no_grad(fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return fn()

    return run


def _train(fn: Callable[[], torch.Tensor], grad: torch.Tensor) -> Callable[[], object]:
    return lambda: torch.autograd.backward(fn(), grad)


def rows(shape: tuple[int, ...], dtype: torch.dtype, backend: str) -> list[tuple[str, str, Callable[[], object]]]:
    """(row, the row it builds on, the call): every layer of the module path, innermost first."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=gen).to(dtype)
    grad = torch.randn(shape, generator=gen).to(dtype)
    module = sn_ext.spectral_norm(WeightHolder(weight.clone()), backend=backend)
    norm = module.parametrizations.weight[0]
    original = module.parametrizations.weight.original
    forward = norm._kernels.forward  # what the module calls: for the compiled op, its direct binding (sn_ext.ops)
    op = backends.get(norm._kernels.backend.name).forward  # the op through torch.ops
    backward = backends.get(norm._kernels.backend.name).backward
    u, v = norm._u, norm._v
    detached = weight.clone()
    w_sn, sigma, u_used, v_used = forward(detached, u, v, 0, 1, 1e-12, False)
    leaf = weight.clone().requires_grad_()
    plain = Plain(weight.clone())
    torch_module = nn.utils.parametrizations.spectral_norm(WeightHolder(weight.clone()))
    eval_module = sn_ext.spectral_norm(WeightHolder(weight.clone()), backend=backend).eval()
    torch_eval = nn.utils.parametrizations.spectral_norm(WeightHolder(weight.clone())).eval()
    return [
        ("forward: op via torch.ops, no autograd", "", _no_grad(lambda: op(detached, u, v, 0, 1, 1e-12, False))),
        ("forward: op, no autograd", "", _no_grad(lambda: forward(detached, u, v, 0, 1, 1e-12, False))),
        ("forward: op under autograd", "forward: op, no autograd", lambda: forward(leaf, u, v, 0, 1, 1e-12, False)),
        ("forward: SpectralNorm.forward", "forward: op under autograd", lambda: norm.forward(original)),
        ("forward: + Module.__call__", "forward: SpectralNorm.forward", lambda: norm(original)),
        ("forward: module.weight (parametrize)", "forward: + Module.__call__", lambda: module.weight),
        ("forward: module()", "forward: module.weight (parametrize)", module),
        ("backward op, no autograd", "", _no_grad(lambda: backward(grad, w_sn, u_used, v_used, sigma, 0))),
        (
            "train: op under autograd",
            "forward: op under autograd",
            _train(lambda: forward(leaf, u, v, 0, 1, 1e-12, False)[0], grad),
        ),
        ("train: module()", "forward: module()", _train(module, grad)),
        ("train: plain W * 1.0", "", _train(plain, grad)),
        ("train: torch spectral_norm", "", _train(torch_module, grad)),
        ("eval: op, no autograd (n = 0)", "", _no_grad(lambda: forward(detached, u, v, 0, 0, 1e-12, False))),
        ("eval: module()", "eval: op, no autograd (n = 0)", _no_grad(eval_module)),
        ("eval: torch spectral_norm", "", _no_grad(torch_eval)),
        ("eval: plain W * 1.0", "", _no_grad(plain)),
    ]


def run(shape: tuple[int, ...], dtype: torch.dtype, backend: str, rounds: int = 3) -> dict[str, float]:
    """Times every row `rounds` times, the rows in turn (so that a burst of load on a shared machine hits one
    round of each, not every block of one row), and prints each row's best."""
    table = rows(shape, dtype, backend)
    timed = {name: float("inf") for name, _, _ in table}
    for _ in range(rounds):
        for name, _, call in table:
            timed[name] = min(timed[name], floor_us(call))
    print(f"{'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')}, backend {backend!r}, 1 thread")
    print(f"{'row':50} {'µs':>8} {'+':>8}")
    for name, base, _ in table:
        extra = f"{timed[name] - timed[base]:8.1f}" if base else ""
        print(f"{name:50} {timed[name]:8.1f} {extra}")
    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="64x3x3x3")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "float64"))
    parser.add_argument("--backend", default="auto", choices=backends.CHOICES)
    parser.add_argument("--rounds", type=int, default=3, help="times each row this many times, keeps the best")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    run(parse_shape(args.shape), getattr(torch, args.dtype), args.backend, args.rounds)


if __name__ == "__main__":
    main()
