"""How many Triton kernel variants a GAN run compiles: each distinct (kernel, specialization, constexprs, options) is
one JIT compile (0.3-0.5 s cold), so the count is the backend's start-up cost (`python -m sn_ext.triton.warm_up`
compiles them ahead, in parallel).

A GAN run: every spectral-normalized weight of sngan's CNN and ResNet discriminators, for 32x32 and 48x48 images
(width 1; the layers of both sizes: 25 weight shapes), through its whole run (sn_ext.triton.warm_up.layer_launches:
the 15 power iterations at creation, the training forward with one and its backward, the eval forward), with the
launches bound for sm_90 but not run (sn_ext/triton/_dry_run.py), so this runs on a CPU. Prints one line per model
and dtype, then the GAN run's total per dtype:

    python -m benchmarks.triton_variants [--dtype float32 ...]
"""

from __future__ import annotations

import argparse
import collections

import torch

from sn_ext.triton import warm_up
from sn_ext.triton._dry_run import why_not
from sngan import models

MODELS = {"cnn": models.CNNDiscriminator, "resnet": models.ResNetDiscriminator}
IMAGE_SIZES = (32, 48)


def model_layers(name: str, img_size: int) -> list[warm_up.Layer]:
    """The (shape, dim, v_first) of the weights spectral norm goes on in one of sngan's discriminators."""
    return warm_up.layers_of(MODELS[name](img_size=img_size))


def gan_layers() -> list[warm_up.Layer]:
    """A GAN run's layers (see the module docstring), each shape once."""
    return list(dict.fromkeys(layer for name in MODELS for size in IMAGE_SIZES for layer in model_layers(name, size)))


def describe(found: dict) -> str:
    per_kernel = collections.Counter(kernel for kernel, _ in found)
    return f"{len(found)} kernel variants ({', '.join(f'{k} {c}' for k, c in sorted(per_kernel.items()))})"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.triton_variants", description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16", "float64"])
    args = p.parse_args(argv)
    reason = why_not()
    if reason:
        print(f"SKIP {reason}")
        return
    for dtype_name in args.dtype or ["float32", "bfloat16"]:
        dtype = getattr(torch, dtype_name)
        for name in MODELS:
            for size in IMAGE_SIZES:
                layers = model_layers(name, size)
                found = warm_up.layers_variants(layers, [dtype])
                shapes = len({shape for shape, _, _ in layers})
                print(
                    f"{name} {size}x{size} discriminator, {dtype_name}: {len(layers)} weights ({shapes} shapes), "
                    f"{describe(found)}"
                )
        layers = gan_layers()
        print(
            f"GAN run, {dtype_name}: {len(layers)} weight shapes, {describe(warm_up.layers_variants(layers, [dtype]))}"
        )


if __name__ == "__main__":
    main()
