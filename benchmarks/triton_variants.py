"""How many Triton kernel variants an SN-GAN discriminator compiles: each distinct (kernel, specialization,
constexprs, options) is one JIT compile (0.25-0.5 s cold), so the count is the backend's start-up cost.

Every spectral-normalized weight of sngan's CNN and ResNet discriminators (32x32 images, width 1) runs one forward
(one power iteration, u-first) and one backward through sn_ext's Triton ops, with the launches bound for sm_90 but
not run (sn_ext/triton/_dry_run.py), so this runs on a CPU. Prints one line per model and dtype:

    python -m benchmarks.triton_variants [--dtype float32 ...]
"""

from __future__ import annotations

import argparse
import collections

import torch
import torch.nn.functional as F

from sn_ext.triton._dry_run import dry_run, why_not
from sngan import models

MODELS = {"cnn": models.CNNDiscriminator, "resnet": models.ResNetDiscriminator}


def weight_shapes(model: torch.nn.Module) -> list[tuple[int, ...]]:
    """The shapes of the weights spectral norm goes on: a discriminator's are Conv2d and Linear (dim 0)."""
    return [tuple(m.weight.shape) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def variants(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> set:
    """The kernel variants one forward and one backward per weight of `shapes` launch."""
    forward = torch.ops.sn_ext.triton_spectral_normalize_.default
    backward = torch.ops.sn_ext.triton_spectral_normalize_backward.default
    with dry_run() as launched:
        for shape in shapes:
            weight = torch.randn(shape, dtype=dtype)
            u = F.normalize(torch.randn(shape[0]), dim=0).to(dtype)
            v = F.normalize(torch.randn(weight[0].numel()), dim=0).to(dtype)
            weight_sn, sigma, u_new, v_new = forward(weight, u, v, 0, 1, 1e-12, False)
            backward(weight_sn, weight_sn, u_new, v_new, sigma, 0)
    return launched


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.triton_variants", description=__doc__)
    p.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16", "float64"])
    args = p.parse_args(argv)
    reason = why_not()
    if reason:
        print(f"SKIP {reason}")
        return
    for dtype_name in args.dtype or ["float32"]:
        dtype = getattr(torch, dtype_name)
        for name, make in MODELS.items():
            shapes = weight_shapes(make())
            found = variants(shapes, dtype)
            per_kernel = collections.Counter(kernel for kernel, _ in found)
            print(
                f"{name} discriminator, {dtype_name}: {len(shapes)} weights ({len(set(shapes))} shapes), "
                f"{len(found)} kernel variants ({', '.join(f'{k} {c}' for k, c in sorted(per_kernel.items()))})"
            )


if __name__ == "__main__":
    main()
