"""How the "ops" section (benchmarks/ops.py) calls sn_ext::spectral_normalize_backward: grad_W = (G - <G, W_sn> u vᵀ)
/ sigma for a weight of the section's shape, with dim 0, through each backend's backward op; W_sn, sigma, u and v
come from the reference forward, untimed."""

from __future__ import annotations

import torch

from sn_ext import backends, reference

from .op_inputs import unit_vectors

BACKENDS = backends.BACKENDS
FLOOR = "G - W_sn"  # the op must at least read G and W_sn and write grad_W


def _forward(weight: torch.Tensor):
    u, v = unit_vectors(weight)
    weight_sn, sigma, u_new, v_new = reference.spectral_normalize(weight, u, v, 0, 1, 1e-12)
    return weight_sn, sigma, u_new, v_new


def floor(weight: torch.Tensor, grad: torch.Tensor):
    weight_sn = _forward(weight)[0]
    return lambda: grad - weight_sn


def call(backend: str, weight: torch.Tensor, grad: torch.Tensor):
    weight_sn, sigma, u, v = _forward(weight)
    backward = backends.get(backend).backward
    return lambda: backward(grad, weight_sn, u, v, sigma, 0)
