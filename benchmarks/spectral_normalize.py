"""How the "ops" section (benchmarks/ops.py) calls sn_ext::spectral_normalize_: a layer's whole forward (one power
iteration, sigma, W / sigma, u and v updated in place) on a weight of the section's shape, with dim 0, through each
backend's forward as modules call it (sn_ext.backends.Backend.forward)."""

from __future__ import annotations

import torch

from sn_ext import backends

from .op_inputs import unit_vectors

BACKENDS = backends.BACKENDS
FLOOR = "W * 1.0"  # the op must at least read W and write W_sn


def floor(weight: torch.Tensor, grad: torch.Tensor):
    return lambda: weight * 1.0


def call(backend: str, weight: torch.Tensor, grad: torch.Tensor):
    u, v = unit_vectors(weight)
    forward = backends.get(backend).forward
    return lambda: forward(weight, u, v, 0, 1, 1e-12)
