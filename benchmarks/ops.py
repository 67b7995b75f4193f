"""Section "ops": each sn_ext op called directly (no module, no autograd), per provider, shape and dtype.

How each op is called lives in the file named after it: benchmarks/spectral_normalize.py,
spectral_normalize_backward.py and power_iteration.py (the grouped ops are the "layers" section's subject:
benchmarks/spectral_normalize_grouped.py). Providers: "floor", the cheapest torch op that reads and writes what the
op must at least (each op file names it), and "sn_ext <backend>" for each backend of the op that can take the
inputs here ("sn_ext reference" is the op in plain torch ops, what torch's eager spectral norm launches).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sn_ext import backends

from . import power_iteration, spectral_normalize, spectral_normalize_backward
from .layer import BASELINE_SHAPES, QUICK_SHAPES, weights_and_grads
from .records import failure, log, rounded, timing_columns
from .timing import Step, measure

OPS = {
    "spectral_normalize_": spectral_normalize,
    "spectral_normalize_backward": spectral_normalize_backward,
    "power_iteration_": power_iteration,
}
SHAPES, QUICK_SHAPES = BASELINE_SHAPES, QUICK_SHAPES
COLUMNS = timing_columns(["op", "shape", "params", "dtype", "provider"], ["of_floor"])


def providers(op_name: str) -> list[str]:
    return ["floor", *(f"sn_ext {b}" for b in OPS[op_name].BACKENDS)]


def steps(op_name: str, provider: str, weights: list[torch.Tensor], grads: list[torch.Tensor]) -> list[Step]:
    """One Step per (weight, grad) copy: `provider`'s call of the op on it."""
    op = OPS[op_name]
    if provider == "floor":
        return [Step(op.floor(w, g)) for w, g in zip(weights, grads)]
    backend = provider.removeprefix("sn_ext ")
    return [Step(op.call(backend, w, g)) for w, g in zip(weights, grads)]


def run(
    shapes: list[str], dtypes: list[torch.dtype], device: torch.device, *, quick: bool, write: Callable[[dict], None]
) -> None:
    budget = 0.05 if quick else 0.3
    for op_name in OPS:
        for dtype in dtypes:
            dtype_name = str(dtype).removeprefix("torch.")
            for shape_text in shapes:
                params, weights, grads = weights_and_grads(shape_text, dtype, device, quick)
                floor_us = None
                for provider in providers(op_name):
                    row = {"op": op_name, "shape": shape_text, "params": params, "dtype": dtype_name}
                    row["provider"] = provider
                    reason = "" if provider == "floor" else _skip_reason(provider, device, dtype)
                    if reason:
                        write({**row, "status": "skipped", "note": reason})
                        continue
                    try:
                        t = measure(steps(op_name, provider, weights, grads), device, budget_s=budget)
                    except Exception as error:
                        write({**row, "status": "failed", "note": failure(error)})
                        log(f"  ops {op_name} {dtype_name} {shape_text} {provider}: failed ({failure(error)})")
                        continue
                    floor_us = t["median_us"] if provider == "floor" else floor_us
                    of_floor = round(t["median_us"] / floor_us, 2) if floor_us else ""
                    write({**row, **rounded(t), "of_floor": of_floor, "status": "ok"})
                    log(f"  ops {op_name} {dtype_name} {shape_text} {provider:16} {t['median_us']:10.1f} us")


def _skip_reason(provider: str, device: torch.device, dtype: torch.dtype) -> str:
    return "; ".join(backends.get(provider.removeprefix("sn_ext ")).not_supported_reasons(device, dtype))
