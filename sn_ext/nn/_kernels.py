"""How a spectral norm (parametrization or legacy hook) holds its kernels through its life: the warm-up at creation,
the run that torch's register_parametrization makes, and a fresh choice after the weight was moved or cast. The
choice itself is sn_ext.backends'; this module writes it into the module (`owner._kernels`)."""

import contextlib

import torch

from .. import backends, ops, sharded
from ..backends import Kernels


def kernels_for(owner, weight: torch.Tensor) -> Kernels:
    """The kernels for `weight` of a module (or legacy hook) `owner` whose `_kernels` were chosen for another
    device or dtype (it was moved or cast): the cached choice, which an eager call also keeps in the owner (a
    compiled one does not: the graph would guard on it and recompile)."""
    kernels = backends.select(owner._kernels.requested, weight.device, weight.dtype)
    if not torch.compiler.is_compiling():
        owner._kernels = kernels
    return kernels


def prepare(
    requested: str,
    weight: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    dim: int,
    n_power_iterations: int,
    eps: float,
    v_first: bool = False,
) -> Kernels:
    """At a module's creation: runs the warm-up power iterations on (u, v) in place and returns the kernels the
    module keeps. The warm-up uses the requested backend, or "auto"'s choice where the requested one cannot take
    the weight (a model built on the CPU for the GPU); the module then chooses again, strictly, when it runs."""
    kernels = backends.initial_kernels(requested, weight)
    warm_up = kernels if kernels.backend is not None else backends.select("auto", weight.device, weight.dtype)
    with torch.no_grad():
        if sharded.is_dtensor(weight):  # tensor parallel: rounds on each rank's shard
            sharded.power_iteration_(weight, u, v, dim, n_power_iterations, eps, v_first)
        elif warm_up.backend.forward_op == "spectral_normalize_":  # compiled kernels: the rounds without W / sigma
            ops.power_iteration_(weight, u, v, dim, n_power_iterations, eps, v_first)
        else:
            warm_up.forward(weight, u, v, dim, n_power_iterations, eps, v_first)
    return kernels


@contextlib.contextmanager
def registering(owner, weight: torch.Tensor):
    """Around torch's register_parametrization, which runs the new parametrization once (a power iteration in
    train mode): if the requested backend cannot take the weight where it is, that run uses "auto"'s choice, as
    the warm-up did; afterwards the module chooses again, strictly, when it runs."""
    kernels = getattr(owner, "_kernels", None)
    if kernels is None or kernels.backend is not None:
        yield
        return
    owner._kernels = backends.select("auto", weight.device, weight.dtype)
    try:
        yield
    finally:
        owner._kernels = kernels
