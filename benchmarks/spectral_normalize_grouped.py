"""Section "layers": all the spectral norms of a model of L layers, as a function of L.

The model is L weights (WeightHolder layers, each `layer_shape`) whose forward returns every layer's normalized
weight; a step is that forward and the backward of one gradient per weight, in train mode (one power iteration
per layer), so spectral norm is all the step does. Providers: plain (`W * 1.0` per layer, the floor), torch (the
parametrization on each layer), sn_ext (sn_ext.spectral_norm on each layer) and sn_ext grouped
(sn_ext.grouped_spectral_norm(model): one op for all layers' forward, one for their backward). Besides the time,
one step is profiled to count its GPU kernels (CUDA) or dispatched ops (CPU).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

import sn_ext

from .layer import WeightHolder, make_layer, make_steps, parse_shape
from .op_count import count_ops
from .records import failure, log, rounded, timing_columns
from .timing import measure, rotation

LAYER_COUNTS = [1, 2, 4, 8, 16, 32]
QUICK_LAYER_COUNTS = [1, 4, 16]
LAYER_SHAPE = "256x256x3x3"
QUICK_LAYER_SHAPE = "64x64x3x3"
PROVIDERS = ["plain", "torch", "sn_ext", "sn_ext grouped"]
COLUMNS = timing_columns(["layers", "layer_shape", "params", "dtype", "provider"], ["per_layer_us", "ops", "ops_all"])


class Stack(nn.Module):
    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self) -> list[torch.Tensor]:
        return [layer() for layer in self.layers]


def make_model(provider: str, weights: list[torch.Tensor]) -> Stack:
    if provider == "sn_ext grouped":
        model = Stack([WeightHolder(w.clone()) for w in weights])
        return sn_ext.grouped_spectral_norm(model, layers=list(model.layers))
    if provider == "sn_ext":  # what "auto" picks: the compiled kernels where they can take the weight
        provider = f"sn_ext {sn_ext.backends.auto_backend(weights[0].device, weights[0].dtype).name}"
    return Stack([make_layer(provider, w.clone()) for w in weights])


def run(
    counts: list[int],
    layer_shape: str,
    dtype: torch.dtype,
    device: torch.device,
    *,
    quick: bool,
    write: Callable[[dict], None],
) -> None:
    budget = 0.05 if quick else 0.5
    shape = parse_shape(layer_shape)
    dtype_name = str(dtype).removeprefix("torch.")
    for count in counts:
        copies = rotation(2 * count * math.prod(shape) * dtype.itemsize, quick)
        gen = torch.Generator().manual_seed(count)
        sets = [[torch.randn(shape, generator=gen).to(device, dtype) for _ in range(count)] for _ in range(copies)]
        grads = [[torch.randn(shape, generator=gen).to(device, dtype) for _ in range(count)] for _ in range(copies)]
        for provider in PROVIDERS:
            row = {
                "layers": count,
                "layer_shape": layer_shape,
                "params": count * math.prod(shape),
                "dtype": dtype_name,
                "provider": provider,
            }
            try:
                steps = make_steps([make_model(provider, weights) for weights in sets], grads, "train")
                t = measure(steps, device, budget_s=budget)
                steps[0].reset()
                ops, ops_all = count_ops(steps[0].run, device)
            except Exception as error:
                write({**row, "status": "failed", "note": failure(error)})
                log(f"  layers L={count:3} {provider:15} failed ({failure(error)})")
                continue
            write(
                {
                    **row,
                    **rounded(t),
                    "per_layer_us": round(t["median_us"] / count, 2),
                    "ops": ops,
                    "ops_all": ops_all,
                    "status": "ok",
                }
            )
            log(f"  layers L={count:3} {provider:15} {t['median_us']:10.1f} us  {ops:6} ops")
