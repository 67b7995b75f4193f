"""How the "ops" section (benchmarks/ops.py) calls sn_ext::power_iteration_: one round of power iteration that
updates u and v in place and returns sigma (what the legacy spectral norm's forward starts with), on a weight of the
section's shape, with dim 0. It has no per-backend ops: "cpu" and "cuda" are the compiled library's kernels (the
dispatcher picks them by device), "reference" is sn_ext.reference.power_iteration_."""

from __future__ import annotations

import torch

from sn_ext import reference

from .op_inputs import unit_vectors

BACKENDS = ("cpu", "cuda", "reference")
FLOOR = "W v"  # a round must at least read W once (torch.mv on the matrix view)


def floor(weight: torch.Tensor, grad: torch.Tensor):
    matrix = weight.flatten(1)
    v = unit_vectors(weight)[1]
    return lambda: torch.mv(matrix, v)


def call(backend: str, weight: torch.Tensor, grad: torch.Tensor):
    u, v = unit_vectors(weight)
    op = reference.power_iteration_ if backend == "reference" else torch.ops.sn_ext.power_iteration_.default
    return lambda: op(weight, u, v, 0, 1, 1e-12)
