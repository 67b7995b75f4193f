"""The sn_ext operators: typed wrappers and fake (meta) kernels for torch.compile; importing this module loads the
kernels and registers the autograd formulas (_autograd.py) and the autocast exclusion (_autocast.py).

Importing this module loads the kernels (see _library.py). The ops, all on W's matrix view for `dim`
(torch's ``W.permute(dim, *others).flatten(1)``, which the kernels read in place):

- ``power_iteration_(W, u, v, dim, n, eps, v_first=False) -> sigma``: n rounds, u and v updated in place.
- ``spectral_normalize_(W, u, v, dim, n, eps, v_first=False, coeff=None, gamma=None, sigma_grad=True) -> (W_sn,
  sigma, u_used, v_used)``: the fused forward, differentiable in W (W_sn and sigma) and gamma, with u and v updated
  in place (one launch on a GPU); u_used, v_used are the vectors after n rounds as fresh tensors (no grad) for
  autograd to save, so that a second call before the first one's backward may update u and v again. n == 0 changes
  nothing; a degenerate round (a non-finite or zero vector) leaves u and v as they were. The scaled forms
  (docs/variants.md) give W_sn = W g / max(sigma, f) instead of W / sigma, in the same pass: ``coeff=c`` bounds
  (g = f = c: W / max(1, sigma / c)), ``gamma`` (a one-element tensor) scales (g = gamma), both multiply;
  ``sigma_grad=False`` stops the gradient through sigma.
- ``spectral_normalize_backward(grad, W_sn, u, v, sigma, dim) -> grad_W``: ``(grad - <grad, W_sn> u v^T) / sigma``.
- ``spectral_normalize_scaled_backward(grad, W, u, v, sigma, dim, coeff=None, gamma=None, sigma_grad=True) ->
  (grad_W, grad_gamma)``: the scaled forms' backward, from W itself: with mu = <grad, W> / max(sigma, f) and
  s = g / max(sigma, f), ``grad_W = s (grad - k mu u v^T)`` (k = 0 where sigma <= f or sigma_grad=False, else 1)
  and ``grad_gamma = mu c`` (c = coeff or 1; in gamma's dtype and shape).
- ``spectral_normalize_grouped_(Ws, us, vs, dims, n, eps, v_first=None, coeffs=None, gammas=None, sigma_grad=None)
  -> (W_sns, sigmas, us_used, vs_used)``: the forward of many layers in one call (one launch on a GPU, both
  power-iteration orders), as spectral_normalize_ per layer with that layer's ``v_first[i]``, ``coeffs[i]``,
  ``gammas[i]``, ``sigma_grad[i]`` (None: u-first, none, none, True for all); ``sigmas`` is a vector.
- ``spectral_normalize_grouped_backward(grads, W_sns, us, vs, sigmas, dims) -> grads_W``: their backward (the plain
  form's; the scaled forms' is the scaled backward, layer by layer).

The other backends' sets (sn_ext.backends) have the same schemas and share the fake kernels and autograd formulas
(register_backend_ops): ``reference_spectral_normalize_(_backward, _scaled_backward)`` (pure PyTorch, always
defined) and ``triton_spectral_normalize_(_backward, _scaled_backward)`` (sn_ext/triton, defined when that backend
is first chosen).
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
    weight: Tensor,
    u: Tensor,
    v: Tensor,
    dim: int,
    n_power_iterations: int,
    eps: float,
    v_first: bool = False,
    coeff: float | None = None,
    gamma: Tensor | None = None,
    sigma_grad: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _ops.spectral_normalize_.default(
        weight, u, v, dim, n_power_iterations, eps, v_first, coeff, gamma, sigma_grad
    )


def spectral_normalize_backward(
    grad: Tensor, weight_sn: Tensor, u: Tensor, v: Tensor, sigma: Tensor, dim: int
) -> Tensor:
    return _ops.spectral_normalize_backward.default(grad, weight_sn, u, v, sigma, dim)


def spectral_normalize_scaled_backward(
    grad: Tensor,
    weight: Tensor,
    u: Tensor,
    v: Tensor,
    sigma: Tensor,
    dim: int,
    coeff: float | None = None,
    gamma: Tensor | None = None,
    sigma_grad: bool = True,
) -> tuple[Tensor, Tensor]:
    return _ops.spectral_normalize_scaled_backward.default(grad, weight, u, v, sigma, dim, coeff, gamma, sigma_grad)


def spectral_normalize_grouped_(
    weights: list[Tensor],
    us: list[Tensor],
    vs: list[Tensor],
    dims: list[int],
    n_power_iterations: int,
    eps: float,
    v_first: list[bool] | None = None,
    coeffs: list[float] | None = None,
    gammas: list[Tensor] | None = None,
    sigma_grad: list[bool] | None = None,
) -> tuple[list[Tensor], Tensor, list[Tensor], list[Tensor]]:
    return _ops.spectral_normalize_grouped_.default(
        weights, us, vs, dims, n_power_iterations, eps, v_first, coeffs, gammas, sigma_grad
    )


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

    def eager_spectral_normalize_(
        weight, u, v, dim, n_power_iterations, eps, v_first=False, coeff=None, gamma=None, sigma_grad=True
    ):
        if not is_compiling() and not has_torch_function((weight, u, v) if gamma is None else (weight, u, v, gamma)):
            if coeff is None and gamma is None and sigma_grad:  # the plain form: the 7 arguments
                out = direct(weight, u, v, dim, n_power_iterations, eps, v_first)
            else:
                out = direct(weight, u, v, dim, n_power_iterations, eps, v_first, coeff, gamma, sigma_grad)
            if out is not NotImplemented:
                return out
        return op(weight, u, v, dim, n_power_iterations, eps, v_first, coeff, gamma, sigma_grad)

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


def _check_gamma(weight: Tensor, gamma: Tensor | None) -> None:
    """The kernels' checks of gamma that its metadata decides (a meta gamma dispatches here: the device too)."""
    if gamma is not None:
        torch._check(gamma.numel() == 1, lambda: "gamma must hold one value")
        torch._check(gamma.device == weight.device, lambda: f"gamma must be on the weight's device {weight.device}")


# Shared by every backend's forward (see register_backend_ops); functionalization handles the update of u and v
# from the schema.
@torch.library.register_fake("sn_ext::spectral_normalize_")
def _fake_forward(weight, u, v, dim, n_power_iterations, eps, v_first=False, coeff=None, gamma=None, sigma_grad=True):
    _check_vector_sizes(weight, u, v, dim)
    _check_gamma(weight, gamma)
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


@torch.library.register_fake("sn_ext::spectral_normalize_scaled_backward")
def _fake_scaled_backward(grad, weight, u, v, sigma, dim, coeff=None, gamma=None, sigma_grad=True):
    torch._check(grad.shape == weight.shape, lambda: "grad must have weight's shape")
    _check_vector_sizes(weight, u, v, dim)
    _check_gamma(weight, gamma)
    return torch.empty_like(weight), _sigma_like(weight) if gamma is None else _contiguous_like(gamma)


@torch.library.register_fake("sn_ext::spectral_normalize_grouped_")
def _(weights, us, vs, dims, n_power_iterations, eps, v_first=None, coeffs=None, gammas=None, sigma_grad=None):
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


def register_backend_ops(forward: str, backward: str, scaled_backward: str, *, autocast: bool = True) -> None:
    """Registers, for a backend's set of ops with the schemas of spectral_normalize_, spectral_normalize_backward and
    spectral_normalize_scaled_backward (names in the sn_ext namespace), the shared fake kernels, the autograd
    formulas (the forward's backward calling `backward` or `scaled_backward`), and optionally the autocast
    exclusion."""
    torch.library.register_fake(f"sn_ext::{forward}", _fake_forward)
    torch.library.register_fake(f"sn_ext::{backward}", _fake_backward)
    torch.library.register_fake(f"sn_ext::{scaled_backward}", _fake_scaled_backward)
    _autograd.register_ops(forward, backward, scaled_backward)
    if autocast:
        _autocast.register_ops((forward, backward, scaled_backward))


# The reference under its own names (sn_ext/_library.py), for the "reference" backend where compiled kernels exist.
register_backend_ops(*_library.REFERENCE_OPS)
