"""Section "bandwidth": a large weight's forward + backward against the device's own copy bandwidth.

A train step with one power iteration must make at least 7 weight-sized passes: the round reads W (W v and
Wᵀ(W v) in one sweep), W / sigma reads W and writes W_sn, <G, W_sn> reads G and W_sn (before anything of grad_W
can be written), and the correction reads G and writes grad_W. A device-to-device copy of the weight makes 2, as
fast as this device moves memory. "effective GB/s" = the bytes of those 7 passes / the provider's time, and
"of copy" = that over the copy's GB/s: the CUDA issue's goal is >= 80% for 4096x4096 float32 (torch's
parametrization is ~7x slower than its floor on an H200).
Providers: copy (`out.copy_(W)`), and the train step (forward with one power iteration + backward) of torch's
parametrization and of sn_ext.spectral_norm, timed side by side (timing.measure_side_by_side), so that the copy's
GB/s is measured under the same load as the steps'.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sn_ext import backends

from .layer import make_layer, make_steps, weights_and_grads
from .records import failure, log, rounded, timing_columns
from .timing import Step, measure_side_by_side

SHAPES = ["4096x4096"]
QUICK_SHAPES = ["512x512"]
PROVIDERS = ["copy", "torch", "sn_ext"]
COLUMNS = timing_columns(["shape", "params", "dtype", "provider"], ["bytes", "effective_gbps", "of_copy"])
TRANSFERS = {"copy": 2, "torch": 7, "sn_ext": 7}  # weight-sized reads + writes each provider must make at least


def _steps(provider: str, weights: list[torch.Tensor], grads: list[torch.Tensor]) -> list[Step]:
    if provider == "copy":
        outs = [torch.empty_like(w) for w in weights]
        return [Step(lambda w=w, o=o: o.copy_(w)) for w, o in zip(weights, outs)]
    layer_provider = (
        "torch" if provider == "torch" else f"sn_ext {backends.auto_backend(weights[0].device, weights[0].dtype).name}"
    )
    return make_steps([make_layer(layer_provider, w.clone()) for w in weights], grads, "train")


def run(
    shapes: list[str], dtype: torch.dtype, device: torch.device, *, quick: bool, write: Callable[[dict], None]
) -> None:
    budget = 0.05 if quick else 0.5
    dtype_name = str(dtype).removeprefix("torch.")
    for shape_text in shapes:
        params, weights, grads = weights_and_grads(shape_text, dtype, device, quick)
        base = {"shape": shape_text, "params": params, "dtype": dtype_name}
        steps_by_provider = {}
        for provider in PROVIDERS:
            try:  # one call first: a provider that fails is left out
                steps = _steps(provider, weights, grads)
                steps[0].run()
            except Exception as error:
                write({**base, "provider": provider, "status": "failed", "note": failure(error)})
                log(f"  bandwidth {shape_text} {provider}: failed ({failure(error)})")
                continue
            steps_by_provider[provider] = steps
        timings = measure_side_by_side(steps_by_provider, device, budget_s=budget)
        copy_gbps = None
        for provider, t in timings.items():
            nbytes = TRANSFERS[provider] * params * dtype.itemsize
            gbps = nbytes / (t["median_us"] * 1e3)
            copy_gbps = gbps if provider == "copy" else copy_gbps
            write(
                {
                    **base,
                    "provider": provider,
                    **rounded(t),
                    "bytes": nbytes,
                    "effective_gbps": round(gbps, 1),
                    "of_copy": round(gbps / copy_gbps, 3) if copy_gbps else "",
                    "status": "ok",
                }
            )
            log(f"  bandwidth {shape_text} {provider:8} {t['median_us']:10.1f} us  {gbps:8.1f} GB/s")
