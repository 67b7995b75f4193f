"""Section "layer": one layer's spectral norm, one power iteration, per provider, shape, dtype and mode.

Modes, as Liger times its ops: "forward" (`module()` in train mode with autograd recording: the power iteration and
W / sigma), "backward" (`w.backward(g)` of a forward run untimed just before), "train" (the full step: forward and
backward, what a training step pays) and "eval" (`with torch.no_grad(): module()`: W / sigma, no power iteration).
`module()` returns the layer's (normalized) weight. Providers:

- plain: `W * 1.0`, the floor of any autograd op on the same weight;
- torch: torch.nn.utils.parametrizations.spectral_norm; torch legacy: torch.nn.utils.spectral_norm;
- torch compiled: torch's parametrization under torch.compile (compiled once per shape, dtype and mode, outside
  the timing; one module whose parameter steps through the same copies of W as the others' modules:
  weight_swapping_steps);
- sn_ext <backend>: sn_ext.spectral_norm(..., backend=...) for each of sn_ext.backends.BACKENDS that can take the
  weight here (the others are skipped, saying why).

The providers of one shape, dtype and mode are timed side by side, their calls interleaved
(timing.measure_side_by_side): the ratios between them do not depend on when each one ran.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import nn

import sn_ext
from sn_ext import backends

from .records import failure, log, rounded, timing_columns
from .timing import Step, measure_side_by_side, rotation

BASELINE_SHAPES = ["64x3x3x3", "128x128x3x3", "256x256x3x3", "512x512x3x3", "1024x1024", "1024x1024x3x3", "4096x4096"]
QUICK_SHAPES = BASELINE_SHAPES[:3]
MODES = ("forward", "backward", "train", "eval")
PROVIDERS = ["plain", "torch", "torch legacy", "torch compiled", *(f"sn_ext {b}" for b in backends.BACKENDS)]
COLUMNS = timing_columns(["shape", "params", "dtype", "mode", "provider"])


class WeightHolder(nn.Module):
    """A layer that is only its weight: forward returns it (normalized, once spectral norm is on it)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self) -> torch.Tensor:
        return self.weight


class Plain(WeightHolder):
    def forward(self) -> torch.Tensor:
        return self.weight * 1.0


def parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.lower().split("x"))


def skip_reason(provider: str, device: torch.device, dtype: torch.dtype, compile_ok: bool) -> str:
    """Why `provider` cannot run here ("" when it can)."""
    if provider == "torch compiled" and not compile_ok:
        return "torch.compile not run (--quick or --no-compile)"
    if provider.startswith("sn_ext "):
        return "; ".join(backends.get(provider.split()[1]).not_supported_reasons(device, dtype))
    return ""


def make_layer(provider: str, weight: torch.Tensor) -> nn.Module:
    """A WeightHolder of `weight` with `provider`'s spectral norm (or none, for "plain")."""
    if provider == "plain":
        return Plain(weight)
    if provider == "torch legacy":
        return nn.utils.spectral_norm(WeightHolder(weight))
    if provider.startswith("sn_ext "):
        return sn_ext.spectral_norm(WeightHolder(weight), backend=provider.split()[1])
    return nn.utils.parametrizations.spectral_norm(WeightHolder(weight))  # "torch", "torch compiled"


def _call(module: nn.Module) -> torch.Tensor:
    return module()


def make_steps(
    modules: list[nn.Module], grads: list[torch.Tensor], mode: str, call: Callable[[nn.Module], torch.Tensor] = _call
) -> list[Step]:
    """One Step per (module, grad) pair (see MODES): forward (train mode, autograd recording), backward of `grad` (a
    tensor, or one per output when the module returns several) after an untimed forward, train = both, eval =
    forward without autograd."""
    steps = []
    for module, grad in zip(modules, grads):
        module.train(mode != "eval")
        if mode == "train":
            steps.append(
                Step(lambda m=module, g=grad: torch.autograd.backward(call(m), g), lambda m=module: m.zero_grad())
            )
        elif mode == "forward":
            steps.append(Step(lambda m=module: call(m), lambda m=module: m.zero_grad()))
        elif mode == "backward":
            steps.append(_backward_step(module, grad, call))
        else:
            steps.append(Step(lambda m=module: _no_grad(call, m)))
    return steps


def weight_swapping_steps(
    module: nn.Module, weights: list[torch.Tensor], grads: list[torch.Tensor], mode: str, call: Callable
) -> list[Step]:
    """make_steps for ONE parametrized module that reads weights[i] in step i: its parameter's data is swapped in
    before each call, outside the timed region. For torch compiled, whose compile guards on the module's class (torch
    makes one per parametrized module), so that a module per copy would compile again for each: this way it reads as
    many copies of W, as far apart in the caches, as the other providers do (a swap of .data keeps the Parameter
    object and its metadata, so the compiled code is reused). u and v are shared by the copies; only their values
    differ from a module per copy, not the work."""
    parameter = module.parametrizations.weight.original

    def swapping(step: Step, weight: torch.Tensor) -> Step:
        def reset() -> None:
            parameter.data = weight
            if step.reset:
                step.reset()

        return Step(step.run, reset)

    steps = make_steps([module] * len(weights), grads, mode, call)
    return [swapping(step, weight) for step, weight in zip(steps, weights)]


def _backward_step(module: nn.Module, grad, call: Callable[[nn.Module], torch.Tensor]) -> Step:
    """The backward alone: Step.reset (untimed, before every call) runs the forward whose graph the call consumes."""
    graph = {}

    def forward() -> None:
        module.zero_grad()
        graph["output"] = call(module)

    return Step(lambda: torch.autograd.backward(graph.pop("output"), grad), forward)


def _no_grad(call, module):
    with torch.no_grad():
        return call(module)


def weights_and_grads(
    shape_text: str, dtype: torch.dtype, device: torch.device, quick: bool
) -> tuple[int, list[torch.Tensor], list[torch.Tensor]]:
    """(elements, weights, grads): random weights of `shape_text` and as many gradients, as many copies as the
    rotation asks for (timing.rotation)."""
    shape = parse_shape(shape_text)
    params = math.prod(shape)
    copies = rotation(2 * params * dtype.itemsize, quick)
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=gen).to(device, dtype) for _ in range(copies)]
    grads = [torch.randn(shape, generator=gen).to(device, dtype) for _ in range(copies)]
    return params, weights, grads


def run(
    shapes: list[str],
    dtypes: list[torch.dtype],
    device: torch.device,
    *,
    quick: bool,
    compile_ok: bool,
    write: Callable[[dict], None],
    modes: tuple[str, ...] = MODES,
) -> None:
    budget = 0.05 if quick else 0.5
    for dtype in dtypes:
        dtype_name = str(dtype).removeprefix("torch.")
        for shape_text in shapes:
            params, weights, grads = weights_and_grads(shape_text, dtype, device, quick)
            if compile_ok:
                torch._dynamo.reset()  # a fresh compile per shape: no recompile limit across a run's shapes
            base = {"shape": shape_text, "params": params, "dtype": dtype_name}

            runnable = {}  # provider -> (modules, call, copies of W)
            for provider in PROVIDERS:
                reason = skip_reason(provider, device, dtype, compile_ok)
                if reason:
                    for mode in modes:
                        write({**base, "provider": provider, "mode": mode, "status": "skipped", "note": reason})
                    continue
                compiled = provider == "torch compiled"
                copies = [w.clone() for w in weights]
                modules = [make_layer(provider, copies[0])] if compiled else [make_layer(provider, w) for w in copies]
                runnable[provider] = (modules, torch.compile(_call) if compiled else _call, copies)
            for mode in modes:
                steps = {
                    provider: functools.partial(weight_swapping_steps, modules[0], copies, grads, mode, call)
                    if provider == "torch compiled"
                    else functools.partial(make_steps, modules, grads, mode, call)
                    for provider, (modules, call, copies) in runnable.items()
                }
                time_side_by_side(steps, {**base, "mode": mode}, device, budget, write, "layer")


def time_side_by_side(
    make_steps_of: dict[str, Callable[[], list[Step]]],
    base: dict,
    device: torch.device,
    budget: float,
    write: Callable[[dict], None],
    section: str,
) -> None:
    """Times the providers' steps (make_steps_of[provider]() makes them) side by side and writes a row per provider
    (`base` its other columns). Each provider's first step runs once first: one that fails (torch.compile without a
    compiler) is left out, its row saying why."""
    steps_by_provider = {}
    what = f"{base['dtype']} {base['shape']} {base['mode']}"
    for provider, make in make_steps_of.items():
        try:
            steps = make()
            if steps[0].reset:
                steps[0].reset()
            steps[0].run()
        except Exception as error:
            write({**base, "provider": provider, "status": "failed", "note": failure(error)})
            log(f"  {section} {what} {provider}: failed ({failure(error)})")
            continue
        steps_by_provider[provider] = steps
    timings = measure_side_by_side(steps_by_provider, device, budget_s=budget)
    for provider, t in timings.items():
        write({**base, "provider": provider, **rounded(t), "status": "ok"})
        log(f"  {section} {what:5} {provider:28} {t['median_us']:10.1f} us")
