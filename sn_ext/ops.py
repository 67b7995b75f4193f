"""The sn_ext operators: typed wrappers and fake (meta) kernels for torch.compile; importing this module loads the
kernels and registers the autograd formulas (_autograd.py) and the autocast exclusion (_autocast.py).

Importing this module loads the kernels (see _library.py). The ops, all on W's matrix view for `dim`
(torch's ``W.permute(dim, *others).flatten(1)``, which the kernels read in place):

- ``power_iteration_(W, u, v, dim, n, eps, v_first=False) -> sigma``: n rounds, u and v updated in place.
- ``spectral_normalize_(W, u, v, dim, n, eps, v_first=False) -> (W_sn, sigma, u_used, v_used)``: the fused
  forward, differentiable in W (W_sn and sigma), with u and v updated in place (one launch on a GPU); u_used,
  v_used are the vectors after n rounds as fresh tensors (no grad) for autograd to save, so that a second call
  before the first one's backward may update u and v again. n == 0 changes nothing; a degenerate round (a
  non-finite or zero vector) leaves u and v as they were.
- ``spectral_normalize_backward(grad, W_sn, u, v, sigma, dim) -> grad_W``: ``(grad - <grad, W_sn> u v^T) / sigma``.
- ``spectral_normalize_grouped_(Ws, us, vs, dims, n, eps, v_first=None) -> (W_sns, sigmas, us_used, vs_used)``: the
  forward of many layers in one call (one launch on a GPU, both power-iteration orders), as spectral_normalize_ per
  layer with that layer's ``v_first[i]`` (None: all u-first); ``sigmas`` is a vector.
- ``spectral_normalize_grouped_backward(grads, W_sns, us, vs, sigmas, dims) -> grads_W``: their backward.

The other backends' pairs (sn_ext.backends) have the same schemas and share the fake kernels and autograd formulas
(register_backend_ops): ``reference_spectral_normalize_(_backward)`` (pure PyTorch, always defined) and
``triton_spectral_normalize_(_backward)`` (sn_ext/triton, defined when that backend is first chosen).
"""

import torch
from torch import Tensor

from . import _autocast, _autograd, _library
from ._matrix import accumulate_dtype

library_status = _library.load()

_ops = torch.ops.sn_ext


def power_iteration_(
    weight: Tensor, u: Tensor, v: Tensor, dim: int, n_power_iterations: int, eps: float, v_first: bool = False
) -> Tensor:
    return _ops.power_iteration_.default(weight, u, v, dim, n_power_iterations, eps, v_first)


def spectral_normalize_(
    weight: Tensor, u: Tensor, v: Tensor, dim: int, n_power_iterations: int, eps: float, v_first: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _ops.spectral_normalize_.default(weight, u, v, dim, n_power_iterations, eps, v_first)


def spectral_normalize_backward(
    grad: Tensor, weight_sn: Tensor, u: Tensor, v: Tensor, sigma: Tensor, dim: int
) -> Tensor:
    return _ops.spectral_normalize_backward.default(grad, weight_sn, u, v, sigma, dim)


def spectral_normalize_grouped_(
    weights: list[Tensor],
    us: list[Tensor],
    vs: list[Tensor],
    dims: list[int],
    n_power_iterations: int,
    eps: float,
    v_first: list[bool] | None = None,
) -> tuple[list[Tensor], Tensor, list[Tensor], list[Tensor]]:
    return _ops.spectral_normalize_grouped_.default(weights, us, vs, dims, n_power_iterations, eps, v_first)


def spectral_normalize_grouped_backward(
    grads: list[Tensor], weights_sn: list[Tensor], us: list[Tensor], vs: list[Tensor], sigmas: Tensor, dims: list[int]
) -> list[Tensor]:
    return _ops.spectral_normalize_grouped_backward.default(grads, weights_sn, us, vs, sigmas, dims)


def _eager_spectral_normalize_():
    """spectral_normalize_ for eager calls from modules: the compiled library's direct binding (sn_ext._C
    spectral_normalize_, csrc/python_module.cpp: the op called unboxed, through every dispatch key), except where
    only torch.ops does the right thing: under torch.compile (Dynamo traces the op, not a C function), for tensor
    subclasses with __torch_function__ and under torch function modes (which must see the op), and for arguments
    the binding does not take as they are (it returns NotImplemented; torch.ops converts or refuses them)."""
    direct = _library.compiled.spectral_normalize_
    op = _ops.spectral_normalize_.default
    is_compiling = torch.compiler.is_compiling
    has_torch_function = torch._C._has_torch_function

    def eager_spectral_normalize_(weight, u, v, dim, n_power_iterations, eps, v_first=False):
        if not is_compiling() and not has_torch_function((weight, u, v)):
            out = direct(weight, u, v, dim, n_power_iterations, eps, v_first)
            if out is not NotImplemented:
                return out
        return op(weight, u, v, dim, n_power_iterations, eps, v_first)

    return eager_spectral_normalize_


def eager_forward(forward_op: str):
    """What modules call for a backend's forward op (sn_ext.backends.Kernels.forward; same arguments and results):
    for the compiled sn_ext::spectral_normalize_ the direct binding above (~2 us less per call than torch.ops),
    else the op."""
    if forward_op == "spectral_normalize_" and _eager_forward is not None:
        return _eager_forward
    return getattr(_ops, forward_op).default


# ---- fake kernels: output metadata only, for torch.compile and FakeTensor ----


def _sigma_like(weight: Tensor) -> Tensor:
    return weight.new_empty((), dtype=accumulate_dtype(weight.dtype))


def _check_vector_sizes(weight: Tensor, u: Tensor, v: Tensor, dim: int) -> None:
    """The shape checks of the real kernels, for tracing (a mismatch fails at compile time, not in the kernel)."""
    rows = weight.shape[dim]
    torch._check(u.dim() == 1 and u.shape[0] == rows, lambda: f"u must be a vector of size {rows}")
    torch._check(
        v.dim() == 1 and v.shape[0] * rows == weight.numel(),
        lambda: f"v must be a vector of size {weight.numel() // rows}",
    )


@torch.library.register_fake("sn_ext::power_iteration_")
def _(weight, u, v, dim, n_power_iterations, eps, v_first=False):
    _check_vector_sizes(weight, u, v, dim)
    return _sigma_like(weight)


# Shared by every backend's forward (see register_backend_ops); functionalization handles the update of u and v
# from the schema.
@torch.library.register_fake("sn_ext::spectral_normalize_")
def _fake_forward(weight, u, v, dim, n_power_iterations, eps, v_first=False):
    _check_vector_sizes(weight, u, v, dim)
    return (
        torch.empty_like(weight),
        _sigma_like(weight),
        torch.empty_like(u, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
    )


@torch.library.register_fake("sn_ext::spectral_normalize_backward")
def _fake_backward(grad, weight_sn, u, v, sigma, dim):
    torch._check(grad.shape == weight_sn.shape, lambda: "grad must have weight_sn's shape")
    _check_vector_sizes(weight_sn, u, v, dim)
    return torch.empty_like(weight_sn)


def _contiguous_like(t: Tensor) -> Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


@torch.library.register_fake("sn_ext::spectral_normalize_grouped_")
def _(weights, us, vs, dims, n_power_iterations, eps, v_first=None):
    sigmas = weights[0].new_empty(len(weights), dtype=accumulate_dtype(weights[0].dtype))
    return (
        [torch.empty_like(w) for w in weights],
        sigmas,
        [_contiguous_like(u) for u in us],
        [_contiguous_like(v) for v in vs],
    )


@torch.library.register_fake("sn_ext::spectral_normalize_grouped_backward")
def _(grads, weights_sn, us, vs, sigmas, dims):
    return [torch.empty_like(w) for w in weights_sn]


# ---- autograd and autocast: registered in C++ by the compiled library, else here ----

if not library_status.loaded:
    _autograd.register()
    _autocast.register()

_eager_forward = _eager_spectral_normalize_() if library_status.loaded else None


# ---- the other backends' ops (sn_ext.backends): same schemas, so the same fake kernels, autograd and autocast ----


def register_backend_ops(forward: str, backward: str, *, autocast: bool = True) -> None:
    """Registers, for a backend's pair of ops with the schemas of spectral_normalize_ and spectral_normalize_backward
    (names in the sn_ext namespace), the shared fake kernels, the autograd formulas (the forward's backward calling
    `backward`), and optionally the autocast exclusion."""
    torch.library.register_fake(f"sn_ext::{forward}", _fake_forward)
    torch.library.register_fake(f"sn_ext::{backward}", _fake_backward)
    _autograd.register_ops(forward, backward)
    if autocast:
        _autocast.register_ops((forward, backward))


# The reference under its own names (sn_ext/_library.py), for the "reference" backend where compiled kernels exist.
register_backend_ops(*_library.REFERENCE_OPS)
